"""Delivery outcomes: what happened to each recipient after the relay handed a message on.

history.py   the records and the store interface (HistoryStore) the rest depends on
store.py     the history's tables and every store method, as SQL for both engines
columns.py   how its sensitive columns are stored and searched
sqlite.py    the embedded SQLite store (one file, WAL, mode 0600)
postgres.py  the PostgreSQL store, one history for several replicas
writer.py    the async side: batched writes on one thread, off the event loop
decide.py    pure rules: report -> status, DSN status codes, bounce and poll schedules, the bulk id
metrics.py   the outcome metric families
dsn.py       pure: the RFC 3464 report, built with the standard library's `email` package
bounces.py   the durable bounce outbox, sent to the company's mail server
reports.py   Infobip's delivery reports, pulled with a filter the relay owns (its own bulkId)
push.py      reports pushed by Infobip to X-IB-Notify-Url, on a listener of their own
trace.py     `relay trace` and GET /messages: a message's timeline in words or JSON
service.py   Outcomes: composes the above; the hooks delivery and the app call
"""
