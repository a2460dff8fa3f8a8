"""Reading a settings file: a flat YAML mapping with the same keys as the CLI options.

PyYAML's safe loader, refusing what a settings file never needs (anchors and aliases, duplicate
keys, keys that are not names), with every problem a `ConfigError` that names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow.errors import ConfigError
from loraflow.flavor.layout import short


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping of settings (the same keys as the CLI options, with underscores).

    Raises:
        ConfigError: the file cannot be read, is binary or not UTF-8, is not YAML, is not a mapping,
            repeats a key, has a key that is not a name, or uses anchors/aliases (a settings file
            needs none, and nested aliases can expand a few hundred bytes into gigabytes). Every
            message quotes at most `MAX_ECHO` characters of the file.
    """
    import yaml

    where = f"config file {short(str(path))}"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err.strerror or err}") from err
    if b"\x00" in raw[:8192]:
        raise ConfigError(f"{where} looks like a binary file (it contains NUL bytes), not YAML text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from err
    try:
        data = yaml.load(text, Loader=_SettingsLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {short(str(err), quote=False)}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of settings, got {type(data).__name__}")
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise ConfigError(f"{where}: every key must be a setting name such as r or learning_rate, got "
                          f"{', '.join(short(k) for k in bad[:5])} ({type(bad[0]).__name__})")
    return data


def _settings_loader():
    import yaml

    class SettingsLoader(yaml.SafeLoader):
        """PyYAML's safe loader, refusing what a settings file never needs and reporting duplicate keys."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"anchors and aliases (*{event.anchor[:40]}) are not supported in a settings file; "
                    "write each value out", event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool, type(None))) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short(key)} (first on line {seen[key] + 1}); each setting "
                        "may appear once", key_node.start_mark)
                if isinstance(key, (str, int, float, bool, type(None))):
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return SettingsLoader


class _LazyLoader:
    """`yaml` is imported on first use only (the CLI's --help must stay fast)."""

    loader = None

    def __call__(self, stream: Any) -> Any:
        if _LazyLoader.loader is None:
            _LazyLoader.loader = _settings_loader()
        return _LazyLoader.loader(stream)


_SettingsLoader = _LazyLoader()
