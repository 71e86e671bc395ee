"""Replicas that share state through Redis ([cluster] redis_url), as KumoMTA's nodes do: the rate budget
(budget.py), the membership with heartbeats (state.py), the breakers (breakers.py); and the hand-off of a
replica's queue to another over SMTP (handoff.py). Without redis_url none of it runs."""
