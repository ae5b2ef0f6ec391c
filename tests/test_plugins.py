"""fdfast.plugins + fdfast.data.sources: entry points loaded once, failures kept until a name needs them."""
from __future__ import annotations

import sys
import threading
import time
import types
from importlib import metadata

import pytest

from fdfast import plugins
from fdfast.data import sources
from fdfast.errors import FDFastError


@pytest.fixture
def fake_plugins(monkeypatch):
    """Replace the installed entry points by fake ones; the real registry state comes back afterwards."""
    saved = (plugins._state, list(plugins._loaded), dict(plugins._failures), dict(sources._SOURCES))
    module = types.ModuleType("fdfast_fake_plugins")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    eps = []

    def add(name: str, fn) -> None:
        setattr(module, name.replace("-", "_"), fn)
        eps.append(metadata.EntryPoint(name, f"{module.__name__}:{name.replace('-', '_')}", plugins.GROUP))

    monkeypatch.setattr(plugins, "_entry_points", lambda: list(eps))
    plugins.reset_plugins()
    sources._SOURCES.clear()  # only what the fake plugins register
    yield add
    plugins._state = saved[0]
    plugins._loaded[:] = saved[1]
    plugins._failures.clear()
    plugins._failures.update(saved[2])
    sources._SOURCES.clear()
    sources._SOURCES.update(saved[3])


def test_each_plugin_is_called_once_even_from_many_threads(fake_plugins, tmp_path):
    calls = []

    def slow():
        time.sleep(0.05)  # a second thread arrives while the first is still loading
        calls.append(threading.get_ident())
        sources.register_source("zz-photos", lambda: tmp_path, "test photos")

    fake_plugins("zz", slow)
    threads = [threading.Thread(target=plugins.load_plugins) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    plugins.load_plugins()
    assert len(calls) == 1 and plugins.loaded_plugins() == ["zz"] and plugins.plugin_failures() == {}
    assert sources.source_dir("zz-photos") == tmp_path and "zz-photos" in sources.source_names()


def test_a_plugin_may_reach_a_registry_while_it_loads(fake_plugins, tmp_path):
    def nested():  # a registry lookup inside register() must not deadlock or load twice
        sources.register_source("nest-a", lambda: tmp_path, "a")
        assert sources.source_dir("nest-a") == tmp_path

    fake_plugins("nest", nested)
    assert sources.source_dir("nest-a") == tmp_path and plugins.loaded_plugins() == ["nest"]


def test_a_broken_plugin_breaks_only_its_own_names(fake_plugins, tmp_path):
    def broken():
        raise ImportError("No module named 'onnxruntime'\n  (second line)")

    fake_plugins("bad", broken)
    fake_plugins("good", lambda: sources.register_source("good-images", lambda: tmp_path, "fine"))
    assert sources.source_dir("good-images") == tmp_path  # the broken plugin costs nothing here
    failures = plugins.plugin_failures()
    assert list(failures) == ["bad"] and "ImportError: No module named 'onnxruntime' (second line)" in failures["bad"]
    with pytest.raises(FDFastError) as e:
        sources.source_dir("bad-images")
    msg = str(e.value)
    assert "plugin 'bad'" in msg and "onnxruntime" in msg and "fix that error" in msg and "\n" not in msg
    with pytest.raises(FDFastError) as e:  # a name nobody claims: listed, with the failure as a hint
        sources.source_dir("nowhere")
    assert "unknown data source 'nowhere'" in str(e.value) and "good-images" in str(e.value)
    assert "bad:" in str(e.value)


def test_source_registry_rules(fake_plugins, tmp_path):
    fn = lambda: tmp_path  # noqa: E731
    sources.register_source("mine", fn, "a folder")
    sources.register_source("mine", fn, "a folder")  # the same function again: fine (a plugin reloaded)
    with pytest.raises(FDFastError, match="already registered"):
        sources.register_source("mine", lambda: tmp_path, "another")
    sources.register_source("mine", lambda: tmp_path / "x", "replaced", replace=True)
    with pytest.raises(FDFastError, match="not a folder"):
        sources.source_dir("mine")
    with pytest.raises(FDFastError, match="non-empty word"):
        sources.register_source("two words", fn, "")
    with pytest.raises(FDFastError, match="reserved for a labelled ImageFolder set"):
        sources.source_dir("demo-labelled")
    assert sources.source_rows() == [{"name": "mine", "help": "replaced"}]


def test_the_demo_plugin_registers_its_sources():
    """With the real entry points: the installed demo plugin provides the default data source."""
    from fdfast.demo.photos import demo_image_dir

    assert "demo" in plugins.loaded_plugins(), plugins.plugin_failures()
    assert sources._entry(sources.DEFAULT_SOURCE).fn is demo_image_dir


def test_a_broken_demo_names_its_install_and_the_data_flag(fake_plugins):
    def broken():
        raise ModuleNotFoundError("No module named 'skimage'")

    fake_plugins("demo", broken)
    with pytest.raises(FDFastError) as e:
        sources.source_dir()  # data.path=None
    msg = str(e.value)
    assert "'demo-images'" in msg and "skimage" in msg and 'pip install -e ".[demo]"' in msg
    assert msg.endswith("pass --data DIR (data.path) to read your own images")
