"""maintenancebot: declarative, safe, scheduled maintenance of Linux fleets over SSH."""

import sys
import types

__version__ = "0.1.0"


def _no_pydantic_plugins() -> None:
    """pydantic lets any installed distribution plug into every validation (entry points in the
    `pydantic` group): a plugin sees each value validated, the config's tokens included, and
    could report them anywhere. Secrets must not leak, and validation is our safety gate, so no
    plugin is loaded, as PYDANTIC_DISABLE_PLUGINS=__all__ would say, whatever else is installed
    in the environment; the search through every distribution's metadata is skipped too. Here,
    because this runs before any of our modules can build a model."""
    loader = types.ModuleType("pydantic.plugin._loader")
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules.setdefault(loader.__name__, loader)


_no_pydantic_plugins()
