"""What a profile changes on the inbound side: which one a transaction gets (at MAIL), its own rate limit,
and its own policy rules added to the global ones."""

from __future__ import annotations

from relay.config import PolicySettings, Settings
from relay.core.profiles import ProfileMatch, select_profile
from relay.core.replies import profile_rate
from relay.inbound.access import Refusal
from relay.inbound.limits import TokenBuckets


class ProfileRules:
    def __init__(self, settings: Settings) -> None:
        self._matches = [
            ProfileMatch(p.name, p.sender_domain, p.sender, p.client_network, p.user) for p in settings.profiles
        ]
        self._policies = {
            p.name: settings.policy.model_copy(update={"rules": [*settings.policy.rules, *p.rules]})
            for p in settings.profiles
            if p.rules
        }
        self._limits = {p.name: p.messages_per_minute for p in settings.profiles if p.messages_per_minute}
        self._buckets = {name: TokenBuckets(limit, 60.0) for name, limit in self._limits.items()}
        self._default = settings.policy

    def select(self, sender: str, client_ip: str, user: str | None) -> str:
        return select_profile(self._matches, sender=sender, client_ip=client_ip, user=user)

    def admit(self, profile: str, now: float) -> Refusal | None:
        """The profile's own `messages_per_minute` (its Infobip account's quota), beside the global one."""
        bucket = self._buckets.get(profile)
        if bucket is None or bucket.take(profile, now):
            return None
        return Refusal("rate_limit", profile_rate(profile, self._limits[profile]))

    def policy(self, profile: str) -> PolicySettings:
        return self._policies.get(profile, self._default)
