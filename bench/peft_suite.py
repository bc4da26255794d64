"""Run PEFT's own LoRA/DoRA tests on PEFT models converted by ``lora_kernels.peft.convert``.

PEFT's test-suite is not installed with peft; it ships in the source distribution. This script

1. downloads the sdist of the *installed* peft version (``pip download --no-deps --no-binary :all:
   peft==X``) into a cache directory and extracts it (once; offline afterwards);
2. collects the LoRA/DoRA selection (see ``SELECTIONS``) of test_custom_models.py,
   test_initialization.py, test_lora_variants.py, test_other.py and test_low_level_api.py;
3. runs it twice in separate pytest processes, offline (HF_HUB_OFFLINE=1): ``baseline`` (plain PEFT)
   and ``converted`` (the pytest plugin :mod:`bench.peft_suite_plugin` converts every LoRA model
   PEFT builds, torch backend);
4. prints the outcome table and every test that passes on PEFT but not once converted.

    python bench/peft_suite.py                      # the full selection (~4,900 tests: about an hour
                                                    #  per mode on 2 busy cores)
    python bench/peft_suite.py --subset ci          # one case per test function (~230 tests, minutes)
    python bench/peft_suite.py -k disable_adapters  # narrow further with pytest's -k
    python bench/peft_suite.py --compare-only       # re-print the table of the last run

Exit status 1 when a test passes on PEFT and not once converted, unless it is listed in
``DOCUMENTED_REFUSALS`` (features docs/models.md lists as refused), 0 otherwise.

Extra packages PEFT's test modules import: diffusers, datasets, scipy, attrs (pip install them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("LK_PEFT_SUITE_DIR", Path.home() / ".cache" / "lora_kernels" / "peft-suite"))

# LoRA classes of test_initialization.py (the file also tests ~30 other tuners).
_INIT_LORA_CLASSES = ("TestLoraInitialization", "TestHotSwapping", "TestScaling", "TestLowCpuMemUsage",
                      "TestWeightTying", "TestLoadPeftKeyMapping", "TestCordaInitialization",
                      "TestEvaInitialization", "TestNamingConflictWarning", "TestLoadAdapterOfflineMode")
_LORA_CONFIG = re.compile(r"[-\[](Bd)?LoraConfig[-\]]")  # not RandLoraConfig, TinyLoraConfig, UniLoraConfig ...
_ANY_CONFIG = re.compile(r"[A-Za-z0-9]*Config\b")


def _custom_models(nodeid: str) -> bool:
    """test_custom_models.py: the cases built with LoraConfig (DoRA is LoraConfig(use_dora=True)), and the
    tests whose name says lora/dora and that are not parametrised with another tuner's config."""
    if _LORA_CONFIG.search(nodeid):
        return True
    name = nodeid.split("::")[-1].split("[")[0].lower()
    return bool(re.search(r"(^|_)(lora|dora)(_|$)", name)) and not _ANY_CONFIG.search(nodeid.split("::")[-1])


SELECTIONS = {
    "test_custom_models.py": _custom_models,
    "test_initialization.py": lambda nodeid: nodeid.split("::")[1] in _INIT_LORA_CLASSES if "::" in nodeid else False,
    "test_lora_variants.py": lambda nodeid: True,
    "test_other.py": lambda nodeid: True,
    "test_low_level_api.py": lambda nodeid: True,
}

# The CI subset: one case of every test function of these files (the first in the fixed shuffled
# order), so every behaviour PEFT tests — merge, disable, several adapters, DoRA, dtypes, save/load,
# pickling, FSDP, hot-swap helpers — is exercised once on a converted model.
CI_FILES = ["test_custom_models.py", "test_lora_variants.py"]


def _shuffled(ids):
    return sorted(ids, key=lambda t: hashlib.sha1(t.encode()).hexdigest())


def one_per_function(ids: list[str]) -> list[str]:
    seen, out = set(), []
    for t in _shuffled(ids):
        fn = t.split("[")[0]
        if fn not in seen:
            seen.add(fn)
            out.append(t)
    return out


# Failures that are refusals by design: features docs/models.md lists as refused, for which the
# converted layer raises NotImplementedError naming the feature (regular expressions on the message).
DOCUMENTED_REFUSALS = (
    r"NotImplementedError: lora_kernels-converted PEFT layer: several active adapters at once",
)


def ensure_sources(cache: Path, version: str) -> Path:
    """The extracted sdist's directory (downloaded on first use)."""
    root = cache / f"peft-{version}"
    if not (root / "tests").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tarball = cache / f"peft-{version}.tar.gz"
        if not tarball.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"peft=={version}", "-d", str(cache)], check=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(cache, filter="data")
    # PEFT's tests import each other relatively (from .testing_common import ...): make them a package.
    (root / "tests" / "__init__.py").touch()
    return root


def _pytest_env(convert: bool, stats: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               LK_PEFT_CONVERT="1" if convert else "0", LK_PEFT_STATS=str(stats), LORA_KERNELS_BACKEND="torch",
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


def _pytest_cmd(extra: list[str]) -> list[str]:
    # addopts of PEFT's pyproject ask for pytest-cov; -p no:randomly etc. are harmless if absent.
    return [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-p", "bench.peft_suite_plugin",
            "-q", "--no-header", "-rN", *extra]


def collect(root: Path, files: list[str], keyword: str | None, out: Path) -> list[str]:
    """Node ids of the selection (collected by pytest, then filtered by SELECTIONS)."""
    args = [f"tests/{f}" for f in files] + (["-k", keyword] if keyword else []) + ["--collect-only"]
    proc = subprocess.run(_pytest_cmd(args), cwd=root, env=_pytest_env(False, out / "collect_stats.json"),
                          capture_output=True, text=True)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line and line.startswith("tests/")]
    if not ids:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit("collection found no tests")
    chosen = [i for i in ids if SELECTIONS[i.split("::")[0].split("/")[-1]](i)]
    return chosen


def run_mode(root: Path, ids: list[str], mode: str, out: Path, timeout: float) -> None:
    """One pytest process over ``ids`` (in a fixed shuffled order, so that a run cut short by the
    timeout still samples every kind of test); results stream to <out>/<mode>.jsonl."""
    order = _shuffled(ids)
    idfile = out / f"{mode}_selection.txt"
    idfile.write_text("\n".join(order) + "\n")
    results = out / f"{mode}.jsonl"
    results.unlink(missing_ok=True)
    log = out / f"{mode}.log"
    env = _pytest_env(mode == "converted", out / f"{mode}_stats.json")
    env["LK_PEFT_RESULTS"] = str(results)
    with open(log, "w") as fh:
        try:
            subprocess.run(_pytest_cmd([f"@{idfile}", "-p", "no:warnings"]), cwd=root, env=env, stdout=fh,
                           stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: timed out after {timeout:.0f} s; {log} and {results} hold what ran", file=sys.stderr)


_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def outcomes(results: Path) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, first line of the message)} from a results file (worst report per test)."""
    found: dict[str, tuple[str, str]] = {}
    if not results.exists():
        return found
    for line in results.read_text().splitlines():
        r = json.loads(line)
        old = found.get(r["id"])
        if old is None or _RANK[r["outcome"]] > _RANK[old[0]]:
            found[r["id"]] = (r["outcome"], r["message"])
    return found


def compare(out: Path) -> int:
    base, conv = outcomes(out / "baseline.jsonl"), outcomes(out / "converted.jsonl")
    counts = {m: Counter(o for o, _ in d.values()) for m, d in (("baseline", base), ("converted", conv))}
    both = set(base) & set(conv)
    print(f"tests run in both modes: {len(both)} (baseline ran {len(base)}, converted ran {len(conv)})")
    print(f"{'outcome':<10}{'baseline':>10}{'converted':>11}")
    for o in ("passed", "failed", "error", "skipped"):
        print(f"{o:<10}{counts['baseline'][o]:>10}{counts['converted'][o]:>11}")
    n_conv_ok = sum(o in ("passed", "skipped") for o, _ in conv.values())
    print(f"converted: {n_conv_ok} of {len(conv)} passed or skipped (no baseline needed for those)")
    trans = Counter((base[t][0], conv[t][0]) for t in base if t in conv)
    print("\ntransitions (baseline → converted):")
    for (a, b), n in sorted(trans.items()):
        print(f"  {a:>8} → {b:<8} {n}")
    regress = sorted(t for t in base if t in conv and base[t][0] == "passed" and conv[t][0] in ("failed", "error"))
    undocumented = [t for t in regress if not any(re.search(p, conv[t][1]) for p in DOCUMENTED_REFUSALS)]
    if regress:
        print(f"\npass → fail: {len(regress)} ({len(regress) - len(undocumented)} documented refusals, "
              f"{len(undocumented)} not; those are listed below the messages)")
        by_msg = Counter(conv[t][1][:120] for t in regress)
        for msg, n in by_msg.most_common(30):
            print(f"  {n:5d}  {msg}")
        for t in undocumented[:400]:
            print(f"    {t}  ::  {conv[t][1][:150]}")
    for mode in ("baseline", "converted"):
        stats = out / f"{mode}_stats.json"
        if stats.exists():
            s = json.loads(stats.read_text())
            print(f"\n{mode}: convert calls {s['calls']}, layers converted {s['converted']}, "
                  f"calls with nothing to convert {s['empty']}")
            for reason, n in sorted(s["skipped"].items(), key=lambda kv: -kv[1])[:25]:
                print(f"    skipped {n:5d}  {reason}")
    return 1 if undocumented else 0


def main(argv=None) -> int:
    import peft

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peft-version", default=peft.__version__)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "peft_suite")
    ap.add_argument("--files", nargs="*", default=list(SELECTIONS))
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression, applied at collection")
    ap.add_argument("--subset", choices=["full", "ci"], default="full")
    ap.add_argument("--modes", nargs="*", default=["baseline", "converted"], choices=["baseline", "converted"])
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per mode")
    ap.add_argument("--limit", type=int, default=0, help="run only N tests, an even sample of the selection")
    ap.add_argument("--compare-only", action="store_true")
    ap.add_argument("--baseline-only-failing", action="store_true",
                    help="run the converted mode first, then plain PEFT only on the tests that failed converted "
                         "(pass→fail needs nothing else; a fraction of the time on a busy machine)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare_only:
        return compare(args.out)
    root = ensure_sources(args.cache, args.peft_version)
    keyword = args.keyword
    files = args.files
    if args.subset == "ci":
        files = CI_FILES
    ids = collect(root, files, keyword, args.out)
    if args.subset == "ci":
        ids = one_per_function(ids)
    if args.limit:  # the first N of the fixed shuffled order: a sample of every kind of test
        ids = _shuffled(ids)[:args.limit]
    print(f"{len(ids)} tests selected from {', '.join(files)} (peft {args.peft_version})", flush=True)
    modes = sorted(args.modes, key=["converted", "baseline"].index) if args.baseline_only_failing else args.modes
    for mode in modes:
        run_ids = ids
        if mode == "baseline" and args.baseline_only_failing:
            conv = outcomes(args.out / "converted.jsonl")
            run_ids = [t for t in ids if t in conv and conv[t][0] in ("failed", "error")]
            print(f"baseline: only the {len(run_ids)} tests that did not pass converted", flush=True)
        if run_ids:  # (an empty selection would make pytest collect the whole directory)
            run_mode(root, run_ids, mode, args.out, args.timeout)
        else:
            (args.out / f"{mode}.jsonl").write_text("")
    return compare(args.out)


if __name__ == "__main__":
    sys.exit(main())
