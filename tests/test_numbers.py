"""One rule for every number a person gives (pipeline.numbers): the same value means the same
thing, or is refused with the same one line, on the command line, in ``--set``, a stage YAML,
the study file and the search file. The tables here are the cases a reviewer names; the
Hypothesis tests (slow tier) draw values by construction, so each knows its answer before the
code under test is asked."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import numbers
from pipeline.plan import load_study
from pipeline.cli import Number, Parser
from pipeline.config import RANGES, Config, build, parse_set
from pipeline.errors import ConfigError, UsageError
from pipeline.numbers import WHOLE_MAX, Range
from pipeline.tune import load_space
from tests.conftest import ROOT

# Each entry point with the least it needs to reach its own parsing.
ENTRY_POINTS = {"ablate": ["--data", "x"], "tune": ["--data", "x"],
                "train": ["--config", "x", "--data", "x"], "split": ["--data", "x"],
                "bench": [], "predict": ["x"], "evaluate": ["--model-uri", "x", "--data", "x"],
                "export": ["--model-uri", "x", "--out", "x"]}
BASIC = str(ROOT / "ablations" / "stages" / "basic.yaml")
MODEL = str(ROOT / "models" / "improved")
# Flags whose value is more than a number, each with its own documented syntax.
OWN_SYNTAX = {("predict", "--every"), ("ablate", "--time-limit")}


class _Parsed(Exception):
    def __init__(self, parser, ns):
        self.parser, self.ns = parser, ns


@contextlib.contextmanager
def _stop_after_parsing():
    """An entry point's main returns its parsed arguments instead of doing its work."""
    real = Parser.parse_known_args

    def grab(self, args=None, namespace=None):
        ns, rest = real(self, args, namespace)
        raise _Parsed(self, ns)

    with mock.patch.object(Parser, "parse_known_args", grab):
        yield


def parse_cli(entry: str, *argv: str):
    """(namespace, None) for arguments that parse, (None, stderr) for a refusal (exit 2)."""
    main = importlib.import_module(f"pipeline.{entry}").main
    err = io.StringIO()
    with _stop_after_parsing(), contextlib.redirect_stderr(err):
        try:
            main([*ENTRY_POINTS[entry], *argv])
        except _Parsed as p:
            return p.ns, None
        except SystemExit as e:
            assert e.code == 2, err.getvalue()
            return None, err.getvalue()
    raise AssertionError(f"{entry} neither parsed nor refused {argv}")


def parser_of(entry: str) -> Parser:
    main = importlib.import_module(f"pipeline.{entry}").main
    with _stop_after_parsing():
        try:
            main(ENTRY_POINTS[entry])
        except _Parsed as p:
            return p.parser
    raise AssertionError(entry)


def number_flags() -> list[tuple[str, str, Number]]:
    out = []
    for entry in ENTRY_POINTS:
        for a in parser_of(entry)._actions:
            if isinstance(a.type, Number):
                out.append((entry, a.option_strings[-1], a.type))
    return out


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("text, value", [("3", 3), ("3.0", 3), (" 3 ", 3), ("+3", 3), (3, 3),
                                         (3.0, 3), ("3e0", 3), ("2147483647", WHOLE_MAX)])
def test_a_whole_number_may_carry_a_zero_fraction_but_keeps_every_digit(text, value):
    got = numbers.parse(text, numbers.WHOLE_1)
    assert got == value and type(got) is int


@pytest.mark.parametrize("value", ["0", 0, "0.0", 0.0, "2.5", 2.5, "three", "nan", math.nan,
                                   "inf", math.inf, "-1", -1, "1e40", 1e40, "2147483648", True,
                                   False, "true", [3], {"a": 3}, "0x10", "1,5",
                                   # found by the generated tests below: Python's int() reads
                                   # Arabic-Indic and other digits, YAML and a reader do not
                                   "٣", "３"])
def test_what_is_not_a_whole_number_1_or_more_is_refused_and_named(value):
    with pytest.raises(numbers.NumberError) as e:
        numbers.parse(value, numbers.WHOLE_1)
    assert str(e.value) == f"expected a whole number from 1 to 2147483647, got " \
                           f"{numbers.shown(value)}"
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_no_value_is_not_given_never_a_falsy_number(value):
    assert numbers.parse(value, numbers.WHOLE_1) is None
    assert numbers.parse(value, numbers.POSITIVE) is None


def test_a_bound_and_its_side_are_said_as_they_are_checked():
    assert Range(low=0, high=1, low_open=True).expected() == "a finite number in (0, 1]"
    assert numbers.parse("1", Range(low=0, high=1, low_open=True)) == 1.0
    with pytest.raises(numbers.NumberError, match=r"in \(0, 1\], got '0'"):
        numbers.parse("0", Range(low=0, high=1, low_open=True))
    assert numbers.SEED.expected() == "a whole number from 0 to 4294967295"
    assert numbers.parse("4294967295", numbers.SEED) == 2**32 - 1


def test_every_numeric_config_key_has_its_range():
    numeric = {k for k, v in Config().to_dict().items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(RANGES)
    for k in numeric:
        assert RANGES[k].whole == isinstance(getattr(Config(), k), int), k


def test_every_typed_flag_of_every_entry_point_reads_by_the_one_rule():
    """A flag added with ``type=float`` would take ``nan`` and ``inf`` and ``1e400``; each
    typed flag is a ``Number`` (or has a syntax of its own, named here)."""
    for entry in ENTRY_POINTS:
        for a in parser_of(entry)._actions:
            if a.type is not None and not isinstance(a.type, Number):
                assert (entry, a.option_strings[-1]) in OWN_SYNTAX, (entry, a.option_strings)


def _file_with(name: str, tmp_path: Path, **changes) -> Path:
    """ablations/<name> with its top-level keys ``changes`` set, written under tmp_path."""
    d = yaml.safe_load((ROOT / "ablations" / name).read_text())
    d.update(changes)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


# --------------------------------------------------------------------------- every surface


def _raw_yaml(d: dict, path: Path, raw: str) -> Path:
    """``d`` as YAML with the placeholder __V__ replaced by ``raw`` as a person would type it."""
    path.write_text(yaml.safe_dump(d, sort_keys=False).replace("__V__", raw))
    return path


def _verdict(fn):
    """("ok", value) or ("refused", the message's "expected ..., got" part)."""
    try:
        return "ok", fn()
    except (ConfigError, UsageError) as e:
        msg = str(e)
        assert "\n" not in msg
        return "refused", msg[msg.index("expected"):msg.index(", got")]


def epochs_on_every_surface(raw: str, tmp_path: Path) -> dict[str, tuple]:
    """The verdict on ``epochs`` written as ``raw`` on each surface. A value not given leaves
    each surface's own default: Config's 15, the study profile's 3, the search profile's 2."""
    study = yaml.safe_load((ROOT / "ablations/study.yaml").read_text())
    study["profiles"]["quick"]["set"]["epochs"] = "__V__"
    space = yaml.safe_load((ROOT / "ablations/tune.yaml").read_text())
    space["profiles"]["smoke"]["set"]["epochs"] = "__V__"
    ns, err = parse_cli("ablate", f"--epochs={raw}")
    cli = ("ok", ns.epochs) if err is None else \
        ("refused", err[err.index("expected"):err.index(", got")])
    return {
        "ablate --epochs": cli,
        "--set": _verdict(lambda: build(None, parse_set([f"epochs={raw}"])).epochs),
        "stage YAML": _verdict(lambda: build(_raw_yaml({"epochs": "__V__"},
                                                       tmp_path / "stage.yaml", raw)).epochs),
        "study.yaml": _verdict(lambda: load_study(_raw_yaml(study, tmp_path / "s.yaml", raw),
                                                  "quick").budget.get("epochs")),
        "tune.yaml": _verdict(lambda: load_space(_raw_yaml(space, tmp_path / "t.yaml", raw),
                                                 "smoke").budget.get("epochs")),
    }


WHOLE_1_REFUSED = ("refused", "expected a whole number from 1 to 2147483647")


@pytest.mark.parametrize("raw", ["0", "0.0", "2.5", "three", "nan", ".nan", "inf", "-1",
                                 "1e40", "true", "[3]"])
def test_epochs_are_refused_alike_on_every_surface(raw, tmp_path):
    assert epochs_on_every_surface(raw, tmp_path) == dict.fromkeys(
        ["ablate --epochs", "--set", "stage YAML", "study.yaml", "tune.yaml"], WHOLE_1_REFUSED)


@pytest.mark.parametrize("raw", ["4", "4.0", "'4'", "4e0"])
def test_epochs_are_read_alike_on_every_surface(raw, tmp_path):
    got = epochs_on_every_surface(raw, tmp_path)
    if raw.startswith("'"):  # quoted: text on the command line too, where quotes are literal
        del got["ablate --epochs"], got["--set"]
    assert set(got.values()) == {("ok", 4)}


def test_epochs_not_given_leave_each_surface_its_default(tmp_path):
    got = epochs_on_every_surface("", tmp_path)
    assert got == {"ablate --epochs": ("ok", None), "--set": ("ok", Config().epochs),
                   "stage YAML": ("ok", Config().epochs), "study.yaml": ("ok", None),
                   "tune.yaml": ("ok", None)}


@pytest.mark.parametrize("raw", ["0", "0.0", "2.5", "three", "nan", "inf", "-1", "1e40", "true"])
def test_seeds_are_refused_alike_on_the_command_line_and_in_the_study_file(raw, tmp_path):
    ns, err = parse_cli("ablate", f"--seeds={raw}")
    assert ns is None and err.count("\n") == 1
    assert f"error: argument --seeds: expected a whole number from 1 to 2147483647, got " \
           f"{raw!r}" in err
    study = yaml.safe_load((ROOT / "ablations/study.yaml").read_text())
    study["seeds"] = "__V__"
    p = _raw_yaml(study, tmp_path / "s.yaml", raw)
    with pytest.raises(UsageError, match=f"^{p}: seeds: expected a whole number from 1 to "
                                         f"2147483647, got "):
        load_study(p, "quick")


def test_a_flag_given_empty_keeps_its_default():
    ns, _ = parse_cli("ablate", "--seeds=", "--jobs=", "--epochs=", "--threads=")
    assert (ns.seeds, ns.jobs, ns.epochs, ns.threads) == (None, 1, None, None)
    ns, _ = parse_cli("tune", "--n-trials=", "--retrain-seeds= ")
    assert (ns.n_trials, ns.retrain_seeds) == (20, 3)
    ns, _ = parse_cli("predict", "--every=")
    assert ns.every.seconds == 1.0


# --------------------------------------------------------------------------- generated values

FUZZ = settings(max_examples=40)


def _bounds(rng: Range) -> tuple[float | None, float | None]:
    return rng.low, rng.top()


def accepted(rng: Range) -> st.SearchStrategy:
    """(text, value): a number inside ``rng``, written in a way a person might write it."""
    lo, hi = _bounds(rng)
    if rng.whole:
        lo = None if lo is None else int(lo) + (1 if rng.low_open else 0)
        hi = None if hi is None else int(hi) - (1 if rng.high_open else 0)
        ks = st.integers(lo, hi)
        return ks.flatmap(lambda k: st.sampled_from(
            [(str(k), k), (f" {k} ", k), (f"{k}.0", k) if abs(k) < 2**53 else (str(k), k)]))
    xs = st.floats(min_value=lo, max_value=hi if hi is not None else 1e300,
                   exclude_min=rng.low_open and lo is not None,
                   exclude_max=rng.high_open and hi is not None,
                   allow_nan=False, allow_infinity=False)
    return xs.map(lambda x: (repr(x), x))


def refused(rng: Range) -> st.SearchStrategy:
    """Text that ``rng`` must refuse: outside it, a fraction for a whole number, not finite, a
    word, a boolean, or any text that is no number."""
    lo, hi = _bounds(rng)
    out = [st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "true", "false", "three",
                            "0x10", "1,5", "1/2", "--1", "1e", "e3", "½", "٣"])]
    if lo is not None:
        out.append(st.floats(max_value=lo, exclude_max=not rng.low_open, allow_nan=False,
                             allow_infinity=False).map(repr))
        if rng.whole:
            out.append(st.integers(max_value=int(lo) - (0 if rng.low_open else 1)).map(str))
    if hi is not None:
        out.append(st.floats(min_value=hi, exclude_min=not rng.high_open, allow_nan=False,
                             allow_infinity=False).map(repr))
        if rng.whole:
            out.append(st.integers(min_value=int(hi) + (0 if rng.high_open else 1)).map(str))
    if rng.whole:
        base = 1 if lo is None else int(lo) + 1
        out.append(st.tuples(st.integers(base, base + 1000), st.integers(1, 999)).map(
            lambda t: f"{t[0]}.{t[1]:03d}"))
    out.append(st.text(max_size=12).filter(lambda t: t.strip() and not _is_number(t)))
    return st.one_of(out)


def _is_number(text: str) -> bool:
    for parse in (int, float):
        try:
            parse(text)
            return True
        except ValueError:
            pass
    return False


@pytest.mark.slow
@pytest.mark.parametrize("entry, flag, kind", number_flags(),
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.slow
def test_every_number_flag_reads_a_number_in_range_and_refuses_the_rest_in_one_line(
        entry, flag, kind):
    @FUZZ
    @given(good=accepted(kind.rng), bad=refused(kind.rng))
    def check(good, bad):
        text, value = good
        ns, err = parse_cli(entry, f"{flag}={text}")
        assert err is None and getattr(ns, flag.lstrip("-").replace("-", "_")) == value
        ns, err = parse_cli(entry, f"{flag}={bad}")
        assert ns is None, (flag, bad)
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"error: argument {flag}: expected {kind.expected()}, got "
                                   f"{numbers.shown(bad)}")

    check()


def _config_value(key: str, raw: str, tmp_path: Path):
    return build(_raw_yaml({key: "__V__"}, tmp_path / "stage.yaml", raw)).to_dict()[key]


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_numeric_config_key_reads_alike_in_yaml_and_in_set(key, tmp_path):
    rng = RANGES[key]

    @FUZZ
    @given(good=accepted(rng), bad=refused(rng), typed=st.booleans())
    def check(good, bad, typed):
        text, value = good
        # The same number typed as a YAML number, or quoted as text: one meaning.
        raw = text.strip() if typed else repr(text)
        # scale_min <= scale_max: the other one at its far end
        extra = {"scale_max": 1e300} if key == "scale_min" else \
            {"scale_min": 5e-324} if key == "scale_max" else {}
        got = build(_raw_yaml({key: "__V__", **extra}, tmp_path / "stage.yaml", raw))
        assert getattr(got, key) == value
        assert getattr(build(None, {**extra, **parse_set([f"{key}={text.strip()}"])}),
                       key) == value
        for b in (lambda: _config_value(key, repr(bad), tmp_path),
                  lambda: build(None, {key: bad})):
            with pytest.raises(ConfigError) as e:
                b()
            msg = str(e.value)
            assert "\n" not in msg and f": {key}: expected {rng.expected()}, got " in msg

    check()


@pytest.mark.slow
@example(section="profiles", value={"quick": {"seeds": None, "set": []}})
@example(section="toggles", value={"tta": {"with": {"epochs": [1]}, "without": {}}})
@settings(max_examples=150)
@given(section=st.sampled_from(["reference", "base", "ladder", "seeds", "reported", "toggles",
                                "profiles", "extra"]),
       value=st.recursive(st.none() | st.booleans() | st.integers() |
                          st.floats(allow_nan=True) | st.text(max_size=8) |
                          st.sampled_from(["quick", "improved", "basic", "epochs", "seeds"]),
                          lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.sampled_from(["quick", "set", "seeds", "epochs",
                                                           "with", "without", "lr", "tta"]),
                                          inner, max_size=3), max_leaves=8))
@pytest.mark.slow
def test_a_study_file_with_any_value_under_any_key_loads_or_is_one_line(section, value,
                                                                         tmp_path):
    """Values of every type under every top-level key of the study file (and an extra key):
    the study loads, or one UsageError line names the file, never another exception."""
    p = _file_with("study.yaml", tmp_path, **{section: value})
    try:
        plan = load_study(p, "quick")
    except UsageError as e:
        assert "\n" not in str(e) and str(e).startswith((str(p), "seeds:")), str(e)
    else:
        assert plan.seeds >= 1 and plan.cells


@pytest.mark.slow
@settings(max_examples=150)
@given(path=st.sampled_from([("sampler",), ("pruner",), ("space", "lr"), ("space", "lr", "low"),
                             ("space", "step_size"), ("profiles", "quick", "set"),
                             ("profiles", "quick", "retrain"), ("base",), ("space",),
                             ("sampler", "seed"), ("pruner", "n_startup_trials")]),
       value=st.recursive(st.none() | st.booleans() | st.integers() |
                          st.floats(allow_nan=True) | st.text(max_size=8) |
                          st.sampled_from(["tpe", "median", "hyperband", "float", "int", "auto"]),
                          lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.sampled_from(["type", "low", "high", "log", "name",
                                                           "seed", "choices", "epochs"]),
                                          inner, max_size=3), max_leaves=8))
@pytest.mark.slow
def test_a_search_file_with_any_value_anywhere_loads_or_is_one_line(path, value, tmp_path):
    d = yaml.safe_load((ROOT / "ablations/tune.yaml").read_text())
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    p = tmp_path / "tune.yaml"
    p.write_text(yaml.safe_dump(d))
    try:
        load_space(p, "quick")
    except UsageError as e:
        assert "\n" not in str(e) and str(e).startswith(str(p)), str(e)


# --------------------------------------------------------------------------- other flags

# A path flag of an entry point, with the other arguments that let that flag be the one that
# fails: the test's generated file (DATA) stands in for a valid data file.
PATH_FLAGS = [("split", ["--data", "{}"]), ("train", ["--config", BASIC, "--data", "{}"]),
              ("train", ["--config", "{}.yaml", "--data", "DATA"]),
              ("evaluate", ["--model-uri", MODEL, "--data", "{}"]),
              ("ablate", ["--data", "{}"]), ("ablate", ["--study", "{}", "--data", "DATA"]),
              ("tune", ["--data", "{}"]), ("tune", ["--space", "{}", "--data", "DATA"])]


def _run_main(entry: str, argv: list[str]) -> tuple[int, str]:
    from pipeline.cli import run_main

    main = importlib.import_module(f"pipeline.{entry}").main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_main(main, argv)
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("entry, args", PATH_FLAGS, ids=lambda v: v if isinstance(v, str) else
                         " ".join(a for a in v if a.startswith("--")))
@pytest.mark.slow
def test_a_path_that_is_not_there_is_one_line_naming_it_and_creates_nothing(entry, args,
                                                                           kaggle_csv, tmp_path):
    @settings(max_examples=15)
    @given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/"),
                        min_size=1, max_size=20).filter(
        # A value starting with "-" reads as a flag, as argparse documents.
        lambda t: not Path(t).exists() and t not in (".", "..") and not t.startswith("-")))
    def check(name):
        before = _tree(tmp_path)
        argv = [str(kaggle_csv) if a == "DATA" else a.format(name) for a in args]
        code, err = _run_main(entry, argv)
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, err
        # A name with a newline or a control character is shown escaped, so the line stays one.
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                        for c in name)
        assert lines[0].startswith("error: ") and shown in lines[0], lines[0]
        assert _tree(tmp_path) == before  # no store, cache, checkpoint or run created

    check()


@pytest.mark.slow
def test_every_choice_flag_refuses_any_other_word_in_one_line():
    flags = [(e, a) for e in ENTRY_POINTS for a in parser_of(e)._actions if a.choices]
    assert len(flags) >= 3  # --profile of both studies, --log-models

    @settings(max_examples=20)
    @given(i=st.integers(0, len(flags) - 1), word=st.text(min_size=1, max_size=12))
    def check(i, word):
        entry, action = flags[i]
        if word in action.choices or word.startswith("-"):
            return
        ns, err = parse_cli(entry, f"{action.option_strings[-1]}={word}")
        assert ns is None and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: argument {action.option_strings[-1]}: invalid choice")

    check()


@pytest.mark.parametrize("name", ["faces\n.csv", "faces\r.csv", "faces\x1c.csv", "faces\u2028.csv"])
def test_a_file_name_with_a_line_break_is_named_escaped_on_one_line(name, tmp_path):
    """Found by the generated paths above: the error printed the name as it was, and a newline
    (or a character `splitlines` breaks at) in it made the one line two."""
    before = _tree(tmp_path)
    code, err = _run_main("split", ["--data", name])
    assert code == 2 and err.count("\n") == 1 and len(err.splitlines()) == 1, repr(err)
    assert name.encode("unicode_escape").decode() in err
    assert _tree(tmp_path) == before


# What the generated files above found, kept as plain cases: each was a TypeError or
# AttributeError traceback, or a line that did not name the file.
@pytest.mark.parametrize("key, value, needle", [
    ("ladder", [None], "ladder: expected a list of stage names or config YAML paths, got nothing"),
    ("ladder", [[]], "ladder: expected a list of stage names or config YAML paths, got []"),
    ("ladder", [], "ladder: expected a list of stage names or config YAML paths, got []"),
    ("reference", "", "unknown stage ''"),
])
def test_a_study_file_s_stages_that_are_not_names_are_one_line_naming_the_file(key, value,
                                                                              needle, tmp_path):
    p = _file_with("study.yaml", tmp_path, **{key: value})
    with pytest.raises(UsageError) as e:
        load_study(p, "quick")
    assert str(e.value).startswith(f"{p}: ") and needle in str(e.value)


@pytest.mark.parametrize("base, needle", [(None, None), (3, "base: expected a stage name or a "
                                                           "config YAML path, got 3"),
                                          ("vgg", "base: unknown stage 'vgg'")])
def test_a_search_file_s_base_is_a_stage_or_one_line_naming_the_file(base, needle, tmp_path):
    p = _file_with("tune.yaml", tmp_path, base=base)
    if needle is None:  # not given: the improved stage
        assert load_space(p, "quick").base_path.name == "improved.yaml"
        return
    with pytest.raises(UsageError) as e:
        load_space(p, "quick")
    assert str(e.value).startswith(f"{p}: ") and needle in str(e.value)


@pytest.mark.slow
@settings(max_examples=150)
@given(values=st.dictionaries(
    st.sampled_from([*Config().to_dict(), "epoch", "Epochs", "lr ", ""]),
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) |
    st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(),
                                                          max_size=2), max_size=4))
def test_a_stage_yaml_with_any_keys_and_values_builds_or_is_one_line_naming_it(values, tmp_path):
    p = tmp_path / "stage.yaml"
    p.write_text(yaml.safe_dump(values))
    try:
        build(p)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith((f"{p}: ", "config: ")), str(e)
    else:
        for k, v in values.items():
            if v is not None and not (isinstance(v, str) and not v.strip()):
                assert k in Config().to_dict()


@pytest.mark.parametrize("entry, args", [("split", []), ("train", ["--config", BASIC]),
                                         ("evaluate", ["--model-uri", MODEL]), ("ablate", []),
                                         ("tune", [])])
def test_data_that_is_not_there_is_refused_before_any_store_is_created(entry, args, tmp_path,
                                                                      monkeypatch):
    """Found by the generated paths: each of these created the tracking store (mlflow.db)
    before it said the data was not there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}")
    (tmp_path / "fresh").mkdir()
    code, err = _run_main(entry, [*args, "--data", "missing.csv"])
    assert code == 2 and err.startswith("error: missing.csv: no such file or folder"), err
    assert list((tmp_path / "fresh").iterdir()) == []


@pytest.mark.parametrize("section, spec, needle", [
    ("sampler", {"name": "tpe", "seed": "three"},
     "sampler tpe: seed: expected a whole number from 0 to 4294967295, got 'three'."),
    ("sampler", {"name": "tpe", "n_trials": 5}, "sampler tpe: unknown key 'n_trials'; valid keys:"),
    ("pruner", {"name": "median", "n_warmup_steps": -1},
     "pruner median: n_warmup_steps: expected a whole number from 0 to 2147483647, got -1."),
    ("pruner", {"name": "hyperband", "reduction_factor": 1},
     "pruner hyperband: reduction_factor: expected a whole number from 2 to 2147483647, got 1."),
    ("pruner", [1], "pruner: expected a mapping such as {name: median}, got [1]."),
])
def test_sampler_and_pruner_arguments_are_read_by_their_ranges(section, spec, needle, tmp_path):
    """Found writing the search-file fuzz: these reached Optuna's constructors as tracebacks."""
    p = _file_with("tune.yaml", tmp_path, **{section: spec})
    with pytest.raises(UsageError) as e:
        load_space(p, "quick")
    assert str(e.value).startswith(f"{p}: {needle}")


def test_a_search_range_written_as_yaml_text_is_the_number_it_reads(tmp_path):
    d = yaml.safe_load((ROOT / "ablations/tune.yaml").read_text())
    d["space"]["lr"] = {"type": "float", "low": "1e-4", "high": "3e-3", "log": True}
    p = tmp_path / "tune.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_space(p, "quick").space["lr"] == {"type": "float", "low": 1e-4, "high": 3e-3,
                                                  "log": True}
