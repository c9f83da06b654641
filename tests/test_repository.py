"""service/repository.py: the repository layout parsed from files only (scan loads no model, so a "bundle"
here is a folder with a manifest.json). Each bad entry is one line on that entry; the others stay served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.repository import scan, single_bundle


def make(root: Path, tree: dict) -> Path:
    """Build a tree: a dict is a folder, a str the text of a file, a dict/list under a .json name is dumped."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in tree.items():
        path = root / name
        if isinstance(value, dict) and not name.endswith(".json"):
            make(path, value)
        else:
            path.write_text(value if isinstance(value, str) else json.dumps(value))
    return root


BUNDLE = {"manifest.json": "{}", "model.onnx": "not loaded by scan"}


def test_a_good_repository(tmp_path):
    root = make(tmp_path / "repo", {
        "helpful": {"1": BUNDLE, "2": BUNDLE, "10": BUNDLE, "README.md": "notes are ignored"},
        "safety": {"3": BUNDLE, "config.json": {"traffic": {"3": 1.0}}},
        "canary": {"1": BUNDLE, "2": BUNDLE, "config.json": {"traffic": {"1": 0.9, "2": 0.1}, "shadow": 2}},
        "shadowed": {"1": BUNDLE, "2": BUNDLE, "config.json": {"shadow": "1"}},
        "mean3": {"ensemble.json": {"members": ["helpful", "safety", "canary"], "aggregate": "mean",
                                    "lambda": 1.0}},
        "uwo": {"ensemble.json": {"members": ["helpful", "safety"], "aggregate": "uwo", "lambda": 0.5}},
        "mix": {"ensemble.json": {"members": ["helpful", "safety"], "aggregate": "weighted",
                                  "weights": {"helpful": 1.0, "safety": 0.5}}},
        "llama": {"ensemble.json": {"members": ["safety", "helpful"], "aggregate": "gate", "gate": "safety",
                                    "below": -1, "else": "helpful"}},
        ".staging": {"1": BUNDLE},
        "notes.txt": "a plain file under the root is ignored",
    })
    layout = scan(root)
    assert layout.errors == {}
    assert sorted(layout.models) == ["canary", "helpful", "safety", "shadowed"]
    helpful = layout.models["helpful"]
    assert helpful.latest() == "10" and helpful.valid_versions() == ["1", "2", "10"]  # numeric, not text order
    assert helpful.versions["2"].path == root / "helpful" / "2" and helpful.traffic is None
    assert layout.models["safety"].traffic == {"3": 1.0}
    canary = layout.models["canary"]
    assert (canary.traffic, canary.shadow, canary.error) == ({"1": 0.9, "2": 0.1}, "2", None)
    assert layout.models["shadowed"].shadow == "1"
    assert {n: (e.members, e.aggregate, e.error) for n, e in layout.ensembles.items()} == {
        "mean3": (["helpful", "safety", "canary"], "mean", None), "uwo": (["helpful", "safety"], "uwo", None),
        "mix": (["helpful", "safety"], "weighted", None), "llama": (["safety", "helpful"], "gate", None)}
    assert layout.ensembles["uwo"].lam == 0.5 and layout.ensembles["mean3"].lam == 1.0
    assert layout.ensembles["mix"].weights == {"helpful": 1.0, "safety": 0.5}
    llama = layout.ensembles["llama"]
    assert (llama.gate, llama.below, llama.otherwise) == ("safety", -1.0, "helpful")


def test_single_bundle(tmp_path):
    bundle = make(tmp_path / "b", BUNDLE)
    layout = single_bundle(bundle, "tiny-rm")
    assert list(layout.models) == ["tiny-rm"] and layout.ensembles == {} and layout.errors == {}
    model = layout.models["tiny-rm"]
    assert model.latest() == "1" and model.versions["1"].path == bundle
    assert single_bundle(tmp_path / "nothing", "x").models["x"].versions["1"].error.startswith("not a bundle")


def test_missing_root_is_an_error_not_an_exception(tmp_path):
    layout = scan(tmp_path / "absent")
    assert layout.models == {} and "cannot be read" in layout.errors["."]


GOOD = {"a": {"1": BUNDLE}, "b": {"1": BUNDLE}}

# (name, extra entries, where the error lands: ("errors"|"version"|"model"|"ensemble", entry, version), substring)
BAD_ENTRIES = [
    ("no manifest", {"m": {"1": {"model.onnx": "x"}}}, ("version", "m", "1"), "not a bundle: no manifest.json"),
    ("bundle at top", {"m": BUNDLE}, ("errors", "m", None), "m/1/manifest.json"),
    ("empty folder", {"m": {"README.md": "x"}}, ("errors", "m", None), "not a model"),
    ("v2", {"m": {"1": BUNDLE, "v2": BUNDLE}}, ("version", "m", "v2"), "'v2' is not a positive integer"),
    ("zero", {"m": {"0": BUNDLE}}, ("version", "m", "0"), "'0' is not a positive integer"),
    ("negative", {"m": {"-1": BUNDLE}}, ("version", "m", "-1"), "'-1' is not a positive integer"),
    ("leading zero", {"m": {"01": BUNDLE}}, ("version", "m", "01"), "'01' is not a positive integer"),
    ("both", {"m": {"1": BUNDLE, "ensemble.json": {"members": ["a"], "aggregate": "mean"}}},
     ("errors", "m", None), "both ensemble.json and version folders"),
    ("config json", {"m": {"1": BUNDLE, "config.json": "{traffic"}}, ("model", "m", None), "not valid JSON"),
    ("config key", {"m": {"1": BUNDLE, "config.json": {"trafic": {"1": 1}}}}, ("model", "m", None),
     'unknown key "trafic"'),
    ("traffic unknown", {"m": {"1": BUNDLE, "config.json": {"traffic": {"1": 0.5, "3": 0.5}}}},
     ("model", "m", None), "traffic names version '3', which does not exist (versions: 1)"),
    ("traffic broken", {"m": {"1": BUNDLE, "2": {}, "config.json": {"traffic": {"1": 0.5, "2": 0.5}}}},
     ("model", "m", None), "version '2', which cannot be served: not a bundle"),
    ("traffic sum", {"m": {"1": BUNDLE, "2": BUNDLE, "config.json": {"traffic": {"1": 0.9, "2": 0.2}}}},
     ("model", "m", None), "must sum to 1, they sum to 1.1"),
    ("traffic negative", {"m": {"1": BUNDLE, "2": BUNDLE, "config.json": {"traffic": {"1": 1.5, "2": -0.5}}}},
     ("model", "m", None), "traffic.2 must be a number >= 0"),
    ("traffic string", {"m": {"1": BUNDLE, "config.json": {"traffic": {"1": "1"}}}}, ("model", "m", None),
     "traffic.1 must be a number"),
    ("shadow unknown", {"m": {"1": BUNDLE, "config.json": {"shadow": "4"}}}, ("model", "m", None),
     "shadow names version '4', which does not exist"),
    ("shadow itself", {"m": {"1": BUNDLE, "2": BUNDLE, "config.json": {"shadow": "2"}}}, ("model", "m", None),
     "the served version itself"),
    ("ensemble json", {"e": {"ensemble.json": '{"members": ["a",]}'}}, ("ensemble", "e", None), "not valid JSON"),
    ("ensemble list", {"e": {"ensemble.json": ["a", "b"]}}, ("ensemble", "e", None), "must be a JSON object"),
    ("no members", {"e": {"ensemble.json": {"members": [], "aggregate": "mean"}}}, ("ensemble", "e", None),
     "members must be a non-empty list"),
    ("members absent", {"e": {"ensemble.json": {"aggregate": "mean"}}}, ("ensemble", "e", None),
     "members must be a non-empty list"),
    ("unknown member", {"e": {"ensemble.json": {"members": ["a", "zz"], "aggregate": "mean"}}},
     ("ensemble", "e", None), "member 'zz' is not a model of this repository (models: a, b)"),
    ("member twice", {"e": {"ensemble.json": {"members": ["a", "a"], "aggregate": "mean"}}},
     ("ensemble", "e", None), "member a listed twice"),
    ("member ensemble", {"e": {"ensemble.json": {"members": ["a", "f"], "aggregate": "mean"}},
                         "f": {"ensemble.json": {"members": ["a", "b"], "aggregate": "mean"}}},
     ("ensemble", "e", None), "member 'f' is an ensemble"),
    ("member unservable", {"m": {"v1": BUNDLE}, "e": {"ensemble.json": {"members": ["a", "m"], "aggregate": "min"}}},
     ("ensemble", "e", None), "member 'm' has no servable version"),
    ("aggregate", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "median"}}}, ("ensemble", "e", None),
     'aggregate must be one of mean, min, uwo, weighted, gate, got "median"'),
    ("no aggregate", {"e": {"ensemble.json": {"members": ["a", "b"]}}}, ("ensemble", "e", None),
     "aggregate must be one of"),
    ("lambda", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "uwo", "lambda": -0.5}}},
     ("ensemble", "e", None), "lambda must be >= 0"),
    ("lambda string", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "uwo", "lambda": "1"}}},
     ("ensemble", "e", None), "lambda must be a finite number"),
    ("weights stranger", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "weighted",
                                                  "weights": {"a": 1, "b": 1, "c": 1}}}},
     ("ensemble", "e", None), "weights name c, not members (a, b)"),
    ("weights missing", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "weighted",
                                                 "weights": {"a": 1}}}},
     ("ensemble", "e", None), "no weight to member b"),
    ("weights absent", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "weighted"}}},
     ("ensemble", "e", None), '"weighted" needs weights'),
    ("weights zero", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "weighted",
                                              "weights": {"a": 0, "b": 0}}}},
     ("ensemble", "e", None), "positive sum"),
    ("weights on mean", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "mean",
                                                 "weights": {"a": 1, "b": 1}}}},
     ("ensemble", "e", None), 'weights only apply to aggregate "weighted"'),
    ("gate missing", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "gate", "gate": "a"}}},
     ("ensemble", "e", None), "missing: below, else"),
    ("gate stranger", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "gate", "gate": "c",
                                               "below": 0, "else": "b"}}},
     ("ensemble", "e", None), 'gate must name a member (a, b), got "c"'),
    ("gate same", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "gate", "gate": "a",
                                           "below": 0, "else": "a"}}},
     ("ensemble", "e", None), "same member"),
    ("gate below", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "gate", "gate": "a",
                                            "below": None, "else": "b"}}},
     ("ensemble", "e", None), "below must be a finite number"),
    ("ensemble config", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "mean"},
                               "config.json": {"traffic": {"1": 1.0}}}},
     ("ensemble", "e", None), "traffic and shadow apply to models, not to an ensemble"),
    ("ensemble key", {"e": {"ensemble.json": {"members": ["a", "b"], "aggregate": "mean", "lamda": 2}}},
     ("ensemble", "e", None), 'unknown key "lamda"'),
]


@pytest.mark.parametrize("extra, where, expected", [case[1:] for case in BAD_ENTRIES],
                         ids=[case[0] for case in BAD_ENTRIES])
def test_a_bad_entry_is_one_line_on_that_entry(tmp_path, extra, where, expected):
    layout = scan(make(tmp_path / "repo", {**GOOD, **extra}))
    kind, entry, version = where
    error = {"errors": lambda: layout.errors.get(entry),
             "version": lambda: layout.models[entry].versions[version].error,
             "model": lambda: layout.models[entry].error,
             "ensemble": lambda: layout.ensembles[entry].error}[kind]()
    assert error is not None and expected in error, error
    assert "\n" not in error
    # the good models are untouched, and nothing outside the planted entries was blamed
    assert all(layout.models[m].latest() == "1" and layout.models[m].error is None for m in GOOD)
    blamed = ({f"errors:{n}" for n in layout.errors}
              | {f"version:{m.name}/{v.version}" for m in layout.models.values() for v in m.versions.values() if v.error}
              | {f"model:{m.name}" for m in layout.models.values() if m.error}
              | {f"ensemble:{e.name}" for e in layout.ensembles.values() if e.error})
    assert f"{kind}:{entry}" + (f"/{version}" if version else "") in blamed
    assert all(b.split(":")[1].split("/")[0] in extra for b in blamed), blamed  # only the planted entries


def test_a_broken_version_leaves_the_others_served(tmp_path):
    layout = scan(make(tmp_path / "repo", {"m": {"1": BUNDLE, "2": BUNDLE, "3": {}, "v4": BUNDLE}}))
    model = layout.models["m"]
    assert model.latest() == "2" and model.valid_versions() == ["1", "2"]
    assert model.versions["3"].error and model.versions["v4"].error


def test_members_with_different_tokenizers_are_allowed(tmp_path):
    """scan never compares tokenizers: each member tokenizes the text itself (service/ensemble.py)."""
    bert = {"manifest.json": json.dumps({"text": {"join": "pair"}}), "tokenizer.json": '{"model": "WordPiece"}'}
    decoder = {"manifest.json": json.dumps({"text": {"join": "chat"}}), "tokenizer.json": '{"model": "BPE"}'}
    layout = scan(make(tmp_path / "repo", {"bert": {"1": bert}, "qwen": {"1": decoder},
                                           "e": {"ensemble.json": {"members": ["bert", "qwen"], "aggregate": "min"}}}))
    assert layout.ensembles["e"].error is None and layout.ensembles["e"].members == ["bert", "qwen"]
