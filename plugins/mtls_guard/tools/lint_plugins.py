"""Where mtls-guard runs: ext-plugin configurations, their policies, and the effective chain per route.

APISIX merges a route's plugins as route > plugin config > service, per plugin *name* (a route's own
``ext-plugin-pre-req`` replaces the whole entry of its plugin config or service, it is not merged into
it), while global rules run in addition to whatever the route has. The checks here follow exactly that,
because "mtls-guard is configured somewhere" is not the same as "mtls-guard runs for this route".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..library import PolicyLibrary
from ..policy import CompiledPolicy, compile_policy
from ..policy_config import HeaderSource, Mode
from ..schema_readers import PolicyError
from .lint_findings import Findings
from .lint_load import Config, Resource
from .lint_policy import named_policy_downgrade

__all__ = ["GUARD", "PRE_REQ", "GuardUse", "PluginAnalysis", "plugins_of"]

GUARD: Final = "mtls-guard"
PRE_REQ: Final = "ext-plugin-pre-req"
_POST_RESP: Final = "ext-plugin-post-resp"
_POST: Final = ("ext-plugin-post-req", _POST_RESP)
_HOLDERS: Final = ("routes", "plugin_configs", "services", "global_rules")


@dataclass(frozen=True, slots=True)
class GuardUse:
    """One ``{"name": "mtls-guard", "value": ...}`` entry of an ext-plugin-pre-req configuration."""

    holder: Resource
    index: int
    policy: CompiledPolicy | None  # None: invalid (the runner answers 503, which fails closed)
    runs_always: bool  # False when disabled or behind a _meta.filter

    @property
    def where(self) -> str:
        return f"{PRE_REQ} conf[{self.index}]"

    @property
    def checks_apisix_cert(self) -> bool:
        """True when the policy judges the certificate APISIX verified (not one forwarded in a header)."""
        return self.policy is not None and not isinstance(self.policy.config.source, HeaderSource)

    @property
    def has_exemptions(self) -> bool:
        return self.policy is not None and bool(self.policy.config.exempt)


def plugins_of(resource: Resource) -> Mapping[str, Any]:
    plugins = resource.value.get("plugins")
    return plugins if isinstance(plugins, Mapping) else {}


def _meta(conf: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = conf.get("_meta")
    return meta if isinstance(meta, Mapping) else {}


def _disabled(conf: Mapping[str, Any]) -> bool:
    # 3.x spells it _meta.disable; older releases accepted a top-level "disable".
    return _meta(conf).get("disable") is True or conf.get("disable") is True


class PluginAnalysis:
    """Validates every ext-plugin configuration and answers "which mtls-guard entries run for route X"."""

    def __init__(
        self, config: Config, findings: Findings, *, known_plugins: Iterable[str], library: PolicyLibrary | None
    ) -> None:
        self.config = config
        self.findings = findings
        self.known = frozenset(known_plugins) | {GUARD}
        self.library = library
        self._compiled: dict[str, CompiledPolicy | PolicyError] = {}
        # holder label -> mtls-guard entries of its ext-plugin-pre-req (empty list: pre-req without guard)
        self.pre_req: dict[str, list[GuardUse]] = {}
        for kind in _HOLDERS:
            for resource in config.of(kind):
                self._check_holder(resource)
        self._check_references()

    # -- per holder ---------------------------------------------------------------------------------

    def _add(self, code: str, resource: Resource, message: str, fix: str) -> None:
        self.findings.add(code, resource.label, message, fix, source=resource.source, line=resource.line)

    def _check_holder(self, resource: Resource) -> None:
        raw = resource.value.get("plugins")
        if raw is not None and not isinstance(raw, Mapping):
            self._add("MG004", resource, "'plugins' must be an object of plugin name -> config", "fix the shape")
            return
        plugins = plugins_of(resource)
        for phase in (PRE_REQ, *_POST):
            if phase in plugins:
                entries = self._ext_entries(resource, phase, plugins[phase])
                if phase == PRE_REQ:
                    self.pre_req[resource.label] = entries

    def _ext_entries(self, resource: Resource, phase: str, conf: object) -> list[GuardUse]:
        if not isinstance(conf, Mapping):
            self._add("MG024", resource, f"{phase} must be an object with 'conf'", "see the ext-plugin docs")
            return []
        entries = conf.get("conf")
        if not isinstance(entries, list) or not entries:
            self._add("MG024", resource, f"{phase}.conf must be a non-empty list of {{name, value}}", "fix the list")
            return []
        degrade = conf.get("allow_degradation", False)
        if not isinstance(degrade, bool):
            self._add("MG024", resource, f"{phase}.allow_degradation must be true or false", "set it to false")
        runs_always = not _disabled(conf) and "filter" not in _meta(conf)
        uses: list[GuardUse] = []
        for index, entry in enumerate(entries):
            at = f"{phase} conf[{index}]"
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
                self._add("MG024", resource, f"{at} needs a non-empty string 'name'", "add the plugin name")
                continue
            name = entry["name"]
            if name not in self.known:
                known = ", ".join(sorted(self.known))
                self._add(
                    "MG023",
                    resource,
                    f"{at}: no runner plugin named {name!r}; the runner rejects the conf and APISIX answers 503",
                    f"use one of: {known} (or install the plugin and pass --plugin {name})",
                )
            value = entry.get("value")
            if not isinstance(value, str):
                self._add(
                    "MG024", resource, f"{at}: 'value' must be a JSON *string*", "quote the policy: value: '{...}'"
                )
                continue
            if name != GUARD:
                continue
            policy = self._policy(resource, at, value)
            if phase == _POST_RESP:
                self._add(
                    "MG029",
                    resource,
                    f"{at}: mtls-guard refuses to run in {_POST_RESP} (the upstream has already handled the request "
                    "by then), so every call fails and APISIX answers 503 after the upstream ran: the route is "
                    "broken and unprotected",
                    f"move the entry to {PRE_REQ}, which runs before authentication, other plugins and the upstream",
                )
                continue
            if phase != PRE_REQ:
                self._add(
                    "MG021",
                    resource,
                    f"{at}: mtls-guard in {phase} runs after authentication and the other plugins, which act on "
                    "requests it later denies",
                    f"move the entry to {PRE_REQ}, which runs before them",
                )
                continue
            uses.append(GuardUse(resource, index, policy, runs_always))
        if uses:
            self._guard_options(resource, conf, degrade)
        return uses

    def _guard_options(self, resource: Resource, conf: Mapping[str, Any], degrade: object) -> None:
        if degrade is True:
            self._add(
                "MG020",
                resource,
                f"{PRE_REQ} carrying mtls-guard has allow_degradation: true; if the runner is down or "
                "unreachable, APISIX passes requests on unfiltered",
                "set allow_degradation: false (the default)",
            )
        if _disabled(conf):
            self._add(
                "MG025",
                resource,
                f"{PRE_REQ} carrying mtls-guard is disabled, so the policy never runs",
                "remove the disable flag, or the plugin if it is not wanted",
            )
        if "filter" in _meta(conf):
            self._add(
                "MG026",
                resource,
                f"{PRE_REQ} carrying mtls-guard has _meta.filter: requests that do not match the filter skip "
                "the policy entirely",
                "drop the filter and express exceptions as mtls-guard exempt rules",
            )

    def _policy(self, resource: Resource, at: str, value: str) -> CompiledPolicy | None:
        if value not in self._compiled:
            try:
                self._compiled[value] = compile_policy(value, self.library)
            except PolicyError as exc:
                self._compiled[value] = exc
        outcome = self._compiled[value]
        if isinstance(outcome, PolicyError):
            hint = " (pass --policy-file)" if "policy file" in str(outcome) else ""
            self._add(
                "MG022",
                resource,
                f"{at}: invalid mtls-guard policy: {outcome}",
                f"fix the policy; `mtls-guard check` explains it{hint}",
            )
            return None
        # A route downgrading a named policy gets MG077 (lint_policy), which names the policy instead.
        if outcome.config.mode is Mode.REPORT and named_policy_downgrade(outcome.config, self.library) is None:
            self._add(
                "MG027",
                resource,
                f"{at}: policy in report mode lets every denied request through (it only logs)",
                'set "mode": "enforce" once the logs show no unexpected denials',
            )
        return outcome

    # -- references and precedence ------------------------------------------------------------------

    def _check_references(self) -> None:
        for route in self.config.of("routes"):
            for key, kind in (("plugin_config_id", "plugin_configs"), ("service_id", "services")):
                ref = route.value.get(key)
                if ref is not None and self.config.get(kind, ref) is None:
                    self._add(
                        "MG016",
                        route,
                        f"{key} {ref!r} names no object in {kind}; APISIX answers every request of this route with 503",
                        f"create {kind}/{ref} or fix the id",
                    )

    def linked(self, route: Resource) -> list[Resource]:
        """The route, its plugin config, its service: in APISIX's precedence order."""
        chain = [route]
        for key, kind in (("plugin_config_id", "plugin_configs"), ("service_id", "services")):
            ref = route.value.get(key)
            linked = self.config.get(kind, ref) if ref is not None else None
            if linked is not None:
                chain.append(linked)
        return chain

    def own_guards(self, route: Resource) -> list[GuardUse]:
        """mtls-guard entries of the ext-plugin-pre-req APISIX keeps for ``route`` (route > plugin config >
        service), disabled or filtered ones included; global rules not included."""
        winner = next((r for r in self.linked(route) if PRE_REQ in plugins_of(r)), None)
        return list(self.pre_req.get(winner.label, [])) if winner is not None else []

    def route_guards(self, route: Resource) -> list[GuardUse]:
        """mtls-guard entries that run (unconditionally) for requests of ``route``, global rules included."""
        uses = self.own_guards(route)
        for rule in self.config.of("global_rules"):
            uses += self.pre_req.get(rule.label, [])
        return [u for u in uses if u.runs_always]

    def check_shadowing(self, route: Resource) -> None:
        """A route's own ext-plugin-pre-req silently replaces a guarded one from its plugin config/service."""
        chain = [r for r in self.linked(route) if PRE_REQ in plugins_of(r)]
        if len(chain) < 2 or self.pre_req.get(chain[0].label):
            return
        for hidden in chain[1:]:
            if self.pre_req.get(hidden.label):
                self._add(
                    "MG028",
                    route,
                    f"{chain[0].label} has its own {PRE_REQ} without mtls-guard, which replaces the one of "
                    f"{hidden.label} (APISIX merges per plugin name: route > plugin config > service); "
                    "mtls-guard does not run here",
                    f"add the mtls-guard entry to {chain[0].label}'s {PRE_REQ} conf list",
                )
                return
