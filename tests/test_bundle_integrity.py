"""Bundle integrity and safe loading: the sha256 manifest refuses a truncated, tampered or swapped model
file and files it does not list (a planted pickle), before anything is loaded; no code path deserializes
pickle.
"""

from __future__ import annotations

import ast
import shutil

import httpx
import pytest

from tests.helpers import REPO, copy_bundle


def test_truncated_model_file_refuses_to_start_and_names_it(start_server, bundle, tmp_path):
    broken = copy_bundle(bundle, tmp_path)
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    server = start_server(bundle_dir=broken, wait_ready=False)
    assert server.proc.wait(timeout=60) == 3
    assert "model.onnx: sha256 mismatch" in server.output()


@pytest.mark.parametrize("victim", ["model.onnx", "tokenizer.json"])
def test_tampered_bundle_refuses_to_start(bundle, start_server, tmp_path, victim):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with open(copy / victim, "ab") as f:
        f.write(b" ")
    server = start_server(copy, wait_ready=False)
    assert server.proc.wait(timeout=60) != 0
    output = server.output()
    assert victim in output and "sha256 mismatch" in output, output
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/readyz", timeout=1.0)


def test_swapped_model_file_and_unlisted_pickle_are_refused(bundle, tmp_path):
    """A different, valid ONNX model in place of the exported one, or a pickle file dropped into the
    bundle: the sha256 manifest catches both before anything is loaded, naming the file."""
    import onnx
    from onnx import TensorProto, helper

    from service.bundle import BundleError, open_bundle

    swapped = copy_bundle(bundle, tmp_path)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(swapped / "model.onnx"))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        open_bundle(swapped)
    planted = tmp_path / "planted"
    shutil.copytree(bundle, planted)
    (planted / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    with pytest.raises(BundleError, match=r"pytorch_model\.bin: not listed in manifest"):
        open_bundle(planted)


# Deserializers that can run code from a file. Serving and exporting read safetensors, ONNX and JSON only.
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


UNSAFE_CALLS = {"torch.load", "pickle.load", "pickle.loads", "pd.read_pickle", "pandas.read_pickle"}


def test_no_code_path_deserializes_pickle():
    """Static check over service/ and export/: no pickle-family import, no torch.load, no np.load with
    allow_pickle, and torch.jit.load only in the TorchScript runtime (reached only after open_bundle)."""
    problems, jit_loads = [], []
    for path in sorted([*(REPO / "service").rglob("*.py"), *(REPO / "export").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in UNSAFE_CALLS:
                    problems.append(f"{where} calls {name}")
                if name.endswith("jit.load"):
                    jit_loads.append(where)
                if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{where} calls {name} with allow_pickle")
    assert not problems, problems
    assert [w.split(":")[0] for w in jit_loads] == ["service/runtime.py"], jit_loads
    source = (REPO / "service" / "served_model.py").read_text()
    assert source.index("open_bundle(self.bundle)") < source.index("load_runtime(self.bundle")
