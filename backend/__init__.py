"""Neural Atlas backend: Hashing Neural Video Decomposition as a library.

Rooms (one responsibility each, dependencies point downward):
clip -> preprocess -> encodings -> model -> losses -> train -> export/edit;
synthetic makes ground-truth clips; service is a thin ZeroMQ layer; cli wires.
"""

__version__ = "0.1.0"


def _alias_source_tree_protocol() -> None:
    """Make `neural_atlas.core` (the one protocol definition, shipped in addon/)
    importable when the backend runs from a source tree that was not pip-installed
    (e.g. a plain copy of the repository on a GPU machine). An installed package
    always wins; nothing happens when neither exists."""
    import importlib.util
    import sys
    from pathlib import Path

    if "neural_atlas" in sys.modules or importlib.util.find_spec("neural_atlas") is not None:
        return
    addon = Path(__file__).resolve().parent.parent / "addon"
    init = addon / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "neural_atlas", init, submodule_search_locations=[str(addon)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["neural_atlas"] = module
    spec.loader.exec_module(module)


_alias_source_tree_protocol()
