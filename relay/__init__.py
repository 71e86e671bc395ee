"""SMTP relay for legacy LAN apps in front of Infobip's SMTP API."""
