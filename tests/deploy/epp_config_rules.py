"""The endpoint picker's configuration loader, ported rule for rule to Python for the tests.

Source: kubernetes-sigs/gateway-api-inference-extension at tag v1.0.0 (the EPP image deploy/ pins):
`pkg/epp/config/loader/configloader.go` (`LoadConfig`: strict decode, `instantiatePlugins`,
`validateSchedulingProfiles`, `loadSchedulerConfig`), `pkg/epp/config/loader/defaults.go` (the two
defaulting phases), `apix/config/v1alpha1/endpointpickerconfig_types.go` (the fields),
`pkg/epp/scheduling/framework/scheduler_profile.go` (`AddPlugins`) and `cmd/epp/runner/runner.go`
(`registerInTreePlugins`: the plugin types a stock EPP knows, and the refusal to start without a
scheduler configuration). The Go loader cannot run here (its module dependencies are not reachable
from this machine), so the rules are ported faithfully instead; each raises `PickerConfigError` with
the Go error's wording. Update this file with the image tag in deploy/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
KIND = "EndpointPickerConfig"

# registerInTreePlugins (runner.go, v1.0.0): type -> the framework interfaces the plugin implements.
# prefix-cache-scorer is a Scorer (and a PreRequest/PostResponse plugin, irrelevant to loading).
PLUGIN_ROLES: dict[str, frozenset[str]] = {
    "prefix-cache-scorer": frozenset({"scorer"}),
    "max-score-picker": frozenset({"picker"}),
    "random-picker": frozenset({"picker"}),
    "weighted-random-picker": frozenset({"picker"}),
    "single-profile-handler": frozenset({"profile-handler"}),
    "kv-cache-utilization-scorer": frozenset({"scorer"}),
    "queue-scorer": frozenset({"scorer"}),
    "lora-affinity-scorer": frozenset({"scorer"}),
    "header-based-testing-filter": frozenset({"filter"}),
}
# Plugins whose factories parse `parameters` (json.Unmarshal into these int fields); the others ignore it.
PLUGIN_PARAMETERS: dict[str, dict[str, type]] = {
    "max-score-picker": {"maxNumOfEndpoints": int},
    "random-picker": {"maxNumOfEndpoints": int},
    "weighted-random-picker": {"maxNumOfEndpoints": int},
    "prefix-cache-scorer": {"hashBlockSize": int, "maxPrefixBlocksToMatch": int, "lruCapacityPerServer": int},
}
# The v1alpha1 fields (json tags); the strict decoder refuses any other and any duplicate.
TOP_FIELDS = {"apiVersion", "kind", "plugins", "schedulingProfiles"}
PLUGIN_FIELDS = {"name", "type", "parameters"}
PROFILE_FIELDS = {"name", "plugins"}
PROFILE_PLUGIN_FIELDS = {"pluginRef", "weight"}
DEFAULT_SCORER_WEIGHT = 1  # defaults.go


class PickerConfigError(ValueError):
    """The picker would refuse this configuration at start."""


@dataclass
class Profile:
    """A scheduling profile as `loadSchedulerConfig` builds it."""

    name: str
    filters: list[str] = field(default_factory=list)
    scorers: dict[str, int] = field(default_factory=dict)  # plugin name -> weight
    picker: str | None = None


@dataclass
class SchedulerConfig:
    profile_handler: str
    profiles: dict[str, Profile]
    plugin_types: dict[str, str]  # plugin name -> type


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys (the strict decoder does)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k) for k, _ in node.value]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise PickerConfigError(f"the configuration is invalid - duplicate field(s) {sorted(duplicates)}")
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _strict_fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise PickerConfigError(f"the configuration is invalid - {where} must be an object")
    unknown = set(obj) - allowed
    if unknown:
        raise PickerConfigError(
            f"the configuration is invalid - unknown field(s) {sorted(unknown)} in {where}"
        )
    return obj


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise PickerConfigError(f"the configuration is invalid - {where}.{key} must be a string")
    return value


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key) or []
    if not isinstance(value, list):
        raise PickerConfigError(f"the configuration is invalid - {where}.{key} must be a list")
    return value


def _decode(text: str) -> dict[str, Any]:
    """loadRawConfig: strict decode into EndpointPickerConfig (known group/version/kind, known fields)."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PickerConfigError(f"the configuration is invalid - {exc}") from None
    raw = _strict_fields(raw, TOP_FIELDS, "EndpointPickerConfig")
    if not raw.get("kind"):
        raise PickerConfigError("the configuration is invalid - Object 'Kind' is missing")
    if (raw.get("apiVersion"), raw.get("kind")) != (API_VERSION, KIND):
        raise PickerConfigError(
            f"the configuration is invalid - no kind {raw.get('kind')!r} is registered for version "
            f"{raw.get('apiVersion')!r}"
        )
    for i, plugin in enumerate(_list(raw, "plugins", "config")):
        _strict_fields(plugin, PLUGIN_FIELDS, f"plugins[{i}]")
    for i, profile in enumerate(_list(raw, "schedulingProfiles", "config")):
        _strict_fields(profile, PROFILE_FIELDS, f"schedulingProfiles[{i}]")
        for j, ref in enumerate(_list(profile, "plugins", f"schedulingProfiles[{i}]")):
            _strict_fields(ref, PROFILE_PLUGIN_FIELDS, f"schedulingProfiles[{i}].plugins[{j}]")
            weight = ref.get("weight")
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)):
                raise PickerConfigError("the configuration is invalid - weight must be an integer")
    return raw


def _check_parameters(plugin_type: str, parameters: Any) -> None:
    """The factories that parse parameters fail on a value json.Unmarshal cannot put in their struct."""
    fields = PLUGIN_PARAMETERS.get(plugin_type)
    if fields is None or parameters is None:
        return
    if not isinstance(parameters, dict):
        raise PickerConfigError(
            f"failed to instantiate the plugin type '{plugin_type}' - parameters not an object"
        )
    for key, value in parameters.items():
        expected = fields.get(key)  # json.Unmarshal ignores unknown keys
        if expected is not None and (isinstance(value, bool) or not isinstance(value, expected)):
            raise PickerConfigError(
                f"failed to instantiate the plugin type '{plugin_type}' - {key} must be an int"
            )


def load_config(text: str) -> SchedulerConfig:
    """`LoadConfig(text)`: the scheduler the picker would run, or `PickerConfigError`."""
    raw = _decode(text)
    plugins: list[dict[str, Any]] = [dict(p) for p in _list(raw, "plugins", "config")]
    profiles: list[dict[str, Any]] = [
        {"name": _string(p, "name", "profile"), "plugins": [dict(r) for r in _list(p, "plugins", "profile")]}
        for p in _list(raw, "schedulingProfiles", "config")
    ]

    # setDefaultsPhaseOne: a plugin without a name is named after its type.
    for plugin in plugins:
        if not _string(plugin, "name", "plugin"):
            plugin["name"] = _string(plugin, "type", "plugin")

    # instantiatePlugins
    types: dict[str, str] = {}
    for plugin in plugins:
        name, plugin_type = plugin["name"], _string(plugin, "type", "plugin")
        if plugin_type == "":
            raise PickerConfigError(f"plugin definition for '{name}' is missing a type")
        if name in types:
            raise PickerConfigError(f"plugin name '{name}' used more than once")
        if plugin_type not in PLUGIN_ROLES:
            raise PickerConfigError(f"plugin type '{plugin_type}' is not found in registry")
        _check_parameters(plugin_type, plugin.get("parameters"))
        types[name] = plugin_type

    def roles(name: str) -> frozenset[str]:
        return PLUGIN_ROLES[types[name]] if name in types else frozenset()

    # setDefaultsPhaseTwo
    if not profiles:
        refs = [{"pluginRef": n} for n in types if roles(n) & {"filter", "scorer", "picker"}]
        profiles = [{"name": "default", "plugins": refs}]
    if len(profiles) == 1 and not any("profile-handler" in roles(n) for n in types):
        types["single-profile-handler"] = "single-profile-handler"
    pickers = [n for n in types if "picker" in roles(n)]
    # Go takes the first picker of a map iteration (random order); with one picker that is it.
    default_picker = pickers[0] if pickers else "max-score-picker"
    if not pickers:
        types["max-score-picker"] = "max-score-picker"
    for profile in profiles:
        has_picker = False
        for ref in profile["plugins"]:
            name = ref.get("pluginRef") or ""
            if "scorer" in roles(name) and ref.get("weight") is None:
                ref["weight"] = DEFAULT_SCORER_WEIGHT
            elif "picker" in roles(name):
                has_picker = True
                break
        if not has_picker:
            profile["plugins"].append({"pluginRef": default_picker})

    # validateSchedulingProfiles (against the plugins as configured, plus those defaulting added)
    seen: set[str] = set()
    configured = set(types)  # config.Plugins, with what defaulting appended
    for profile in profiles:
        if profile["name"] == "":
            raise PickerConfigError("SchedulingProfile must have a name")
        if profile["name"] in seen:
            raise PickerConfigError(
                f"the name '{profile['name']}' has been specified for more than one SchedulingProfile"
            )
        seen.add(profile["name"])
        for ref in profile["plugins"]:
            name = ref.get("pluginRef") or ""
            if not name:
                raise PickerConfigError(
                    f"SchedulingProfile '{profile['name']}' plugins must have a plugin reference"
                )
            if name not in configured:
                raise PickerConfigError(f"{name} is a reference to an undefined Plugin")

    # loadSchedulerConfig (SchedulerProfile.AddPlugins)
    built: dict[str, Profile] = {}
    for profile in profiles:
        result = Profile(profile["name"])
        for ref in profile["plugins"]:
            name = ref["pluginRef"]
            if "scorer" in roles(name):
                result.scorers[name] = ref["weight"]
            if "filter" in roles(name):
                result.filters.append(name)
            if "picker" in roles(name):
                if result.picker is not None:
                    raise PickerConfigError(
                        f"failed to load scheduler config - failed to set '{name}' as picker, already have "
                        f"a registered picker plugin '{result.picker}'"
                    )
                result.picker = name
        built[profile["name"]] = result
    handlers = [n for n in types if "profile-handler" in roles(n)]
    if len(handlers) > 1:
        raise PickerConfigError(
            f"only one profile handler is allowed. Both {handlers[0]} and {handlers[1]} are profile handlers"
        )
    if not handlers:
        raise PickerConfigError("no profile handler was specified")
    return SchedulerConfig(handlers[0], built, types)


def dumps(obj: Any) -> str:
    """A config object as the text the picker reads (tests build broken variants this way)."""
    return json.dumps(obj)
