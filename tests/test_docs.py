"""Documentation consistency: the tables in docs/ are the committed result files, row for row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "docs" / "performance.md"


def test_recipe_panel_table_is_the_committed_panel():
    """The panel table is results/panel's rows, lora's from results/panel_lora (today's default);
    results/panel's own lora rows (the earlier default) are not in it."""
    doc = (ROOT / "docs" / "recipe.md").read_text()
    table = doc[doc.index("### The panel's results"):doc.index("--check results/panel_lora/panel.json")]

    def rows(folder):
        text = (ROOT / "results" / folder / "panel.md").read_text()
        return [line for line in text.splitlines()
                if re.match(r"\| \w+ \| [\w-]+ \|", line) and not line.startswith("| dataset |")]

    panel, lora = rows("panel"), rows("panel_lora")
    assert len(panel) >= 12 and len(lora) == 4 and all("| lora |" in row for row in lora)
    for row in [r for r in panel if "| lora |" not in r] + lora:
        assert row in table, f"docs/recipe.md's panel table lacks the row: {row}"
    for row in (r for r in panel if "| lora |" in r):
        assert row not in table, f"docs/recipe.md's panel table shows the earlier default's row: {row}"


PANELS_512 = {  # results folder -> (the recipe section that shows it, where that section ends)
    "panel_pooler": ("### The panel's results", "#### At 512 tokens before the pooler's adapter"),
    "panel_512": ("#### At 512 tokens before the pooler's adapter", "#### At 256 tokens"),
}
"""The panels at 512 tokens: today's defaults, and the one before lora's pooler adapter."""


@pytest.mark.parametrize("folder", sorted(PANELS_512))
def test_recipe_panel_at_512_tokens_is_the_committed_panel(folder):
    """A panel at 512 tokens (last-two-layers at 3e-3) is results/`folder`'s every row, its criteria
    block is what `panel.py --check` prints on it, and it ran lorafit's defaults with nothing set."""
    from lorafit.config import RunConfig
    from lorafit.strategies import STRATEGIES

    doc = (ROOT / "docs" / "recipe.md").read_text()
    start, end = PANELS_512[folder]
    section = doc[doc.index(start):doc.index(end, doc.index(start) + len(start))]
    text = (ROOT / "results" / folder / "panel.md").read_text()
    rows = [line for line in text.splitlines()
            if re.match(r"\| \w+ \| [\w-]+ \|", line) and not line.startswith("| dataset |")]
    assert len(rows) == 4 * 6  # four datasets, three strategies and three references each
    for row in rows:
        assert row in section, f"docs/recipe.md's panel of results/{folder} lacks the row: {row}"
    panel = ROOT / "results" / folder / "panel.json"
    lines, majority = _criteria_lines(panel)
    block = "```\n" + "\n".join(lines) + "\n```\n\nand " + majority
    assert block in section, f"docs/recipe.md lacks the block:\n{block}"
    assert RunConfig().max_length == 512 and STRATEGIES["last-two-layers"].default_lr == 3e-3
    made = json.loads(panel.read_text())
    assert "--extra" not in made["command"], "a panel at the defaults sets nothing but the defaults"
    for record in made["records"]:
        if record["method"] in STRATEGIES:
            assert record["lr"] == STRATEGIES[record["method"]].default_lr, record


def test_the_panel_at_todays_defaults_trained_lora_with_the_pooler_adapter():
    """results/panel_pooler's lora runs trained what today's default trains on all-MiniLM-L6-v2: the
    encoder's and the pooler's adapters and the classifier (384 x K + K for K classes)."""
    from lorafit.config import RunConfig

    assert RunConfig().targets == ["encoder", "pooler", "classifier"]
    classes = {"drugs": 3, "rt": 3, "spam": 2, "imdb": 2}
    records = [r for r in json.loads((ROOT / "results" / "panel_pooler" / "panel.json").read_text())["records"]
               if r["method"] == "lora"]
    assert len(records) == 12
    for r in records:
        assert r["trainable_params"] == 169_730 - 770 + 385 * classes[r["dataset"]], r


def _seeds(folder: str, dataset: str, method: str) -> list[float]:
    """The three seeds' macro-F1 of one dataset and method in results/`folder`/panel.json."""
    found = [r["macro_f1"] for r in json.loads((ROOT / "results" / folder / "panel.json").read_text())["records"]
             if r["dataset"] == dataset and r["method"] == method]
    assert len(found) == 3, (folder, dataset, method)
    return found


def _study_row(dataset: str, seeds: list[float], *means: float) -> str:
    """A study table's row: the dataset, its seeds, their mean, then the columns it is compared with."""
    cells = [" / ".join(f"{s:.3f}" for s in seeds), *(f"{m:.3f}" for m in (sum(seeds) / 3, *means))]
    return "| " + " | ".join([dataset, *cells]) + " |"


def test_recipe_standardize_table_is_the_committed_runs():
    """The study of last-two-layers reading standardized features: each dataset's seeds and mean are
    results/recipe_last2/std-512's, and its comparison columns are results/panel_512's probe and the
    unstandardized runs of results/recipe_maxlen/last2-lr3e-3."""
    doc = (ROOT / "docs" / "recipe.md").read_text()
    table = table_after(doc, "| dataset | standardized, per seed |").replace("**", "")
    for dataset in ("drugs", "spam", "rt", "imdb"):
        want = _study_row(dataset, _seeds("recipe_last2/std-512", dataset, "last-two-layers-std"),
                          sum(_seeds("recipe_maxlen/last2-lr3e-3", dataset, "last-two-layers-maxlen512-lr3e-3")) / 3,
                          sum(_seeds("panel_512", dataset, "probe-512")) / 3)
        assert want in table.splitlines(), want


def test_recipe_pooler_adapter_table_is_the_committed_runs():
    """The study of an adapter on the head's first layer: each dataset's seeds and mean are
    results/recipe_lora_pooler's; lora's default, TF-IDF and full are results/panel_512's means."""
    doc = (ROOT / "docs" / "recipe.md").read_text()
    table = table_after(doc, "| dataset | with the pooler adapter, per seed |").replace("**", "")
    for dataset in ("drugs", "rt", "spam", "imdb"):
        want = _study_row(dataset, _seeds(f"recipe_lora_pooler/{dataset}", dataset, "lora-pooler"),
                          *(sum(_seeds("panel_512", dataset, m)) / 3 for m in ("lora", "tfidf-lr", "full")))
        assert want in table.splitlines(), want


def test_recipe_fresh_first_layer_table_is_the_committed_mpnet_runs():
    """The MPNet study of the head's fresh first layer, and full fine-tuning beside it: each row's
    trainable parameters, seeds, mean macro-F1 and mean accuracy are results/mpnet_pooler's."""
    doc = (ROOT / "docs" / "recipe.md").read_text()
    table = table_after(doc, "| MPNet on drugs | trainable parameters |").replace("**", "")
    for folder, method, label in (("trained", "lora", "first layer trained fully"),
                                  ("frozen", "lora-nopooler", "first layer frozen at its random start (today)"),
                                  ("full", "full", "full fine-tuning, for reference")):
        records = sorted((r for r in json.loads((ROOT / "results" / "mpnet_pooler" / folder / "panel.json")
                                                .read_text())["records"] if r["method"] == method),
                         key=lambda r: r["seed"])
        assert [r["seed"] for r in records] == [0, 1, 2] and len({r["trainable_params"] for r in records}) == 1
        f1, acc = [r["macro_f1"] for r in records], [r["accuracy"] for r in records]
        want = (f"| {label} | {records[0]['trainable_params']:,} | " + " / ".join(f"{x:.3f}" for x in f1)
                + f" | {sum(f1) / 3:.3f} | {sum(acc) / 3:.3f} |")
        assert want in table.splitlines(), want


def test_recipe_capacity_table_is_the_committed_lever_runs():
    """Every lever run's macro-F1 per seed in results/recipe_rank/*/panel.md is in docs/recipe.md's table,
    with the flags that made it."""
    doc = (ROOT / "docs" / "recipe.md").read_text()
    start, end = doc.index("**Capacity and rate, measured"), doc.index("**The classifier trains fully.**")
    table = doc[start:end]
    found = 0
    for panel in sorted((ROOT / "results" / "recipe_rank").glob("*/panel.md")):
        text = panel.read_text()
        flags = re.search(r"'--extra=([^']+)'|--extra=(\S+)", text)
        flags = (flags.group(1) or flags.group(2)).strip()
        for dataset, per_seed in re.findall(r"^\| (\w+) \| lora-\w+ \|[^|]+\|[^|]+\| ([\d. /]+) \|", text, re.M):
            row = next((line for line in table.splitlines() if line.startswith(f"| `{flags}` |")), None)
            assert row, f"docs/recipe.md's capacity table has no row for {flags} ({panel})"
            cell = per_seed.strip()
            assert cell in row.replace("**", ""), f"{panel}: {dataset} {cell} not in the row {row}"
            found += 1
    assert found >= 8


LR_AUTO_FLAGS = {"lrauto": "--lr auto", "r16a16-lrauto": "--rank 16 --alpha 16 --lr auto"}
"""The panel tag of each `--lr auto` study in results/recipe_lrauto/chosen.json, and its flags."""


def test_lr_auto_table_is_the_committed_runs():
    """docs/recipe.md's `--lr auto` table: each row's macro-F1 per seed, mean, rates chosen and
    search cost are results/recipe_lrauto/chosen.json's; the default's mean is results/panel's."""
    import statistics

    doc = (ROOT / "docs" / "recipe.md").read_text()
    records = json.loads((ROOT / "results" / "recipe_lrauto" / "chosen.json").read_text())["records"]
    panel = json.loads((ROOT / "results" / "panel" / "panel.json").read_text())["records"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        groups.setdefault((r["tag"], r["dataset"]), []).append(r)
    for (tag, dataset), runs in groups.items():
        f1 = [r["test_macro_f1"] for r in runs]
        head = (f"| `{LR_AUTO_FLAGS[tag]}` | {dataset} | {' / '.join(f'{x:.3f}' for x in f1)} | "
                f"{statistics.mean(f1):.3f} |")
        line = next((line for line in doc.splitlines() if line.startswith(head)), None)
        assert line, f"docs/recipe.md's --lr auto table lacks {head}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5] == " / ".join(f"{r['lr_chosen']:g}" for r in runs), line
        assert cells[6] == f"{statistics.median(r['search_over_train'] for r in runs):.2f}x", line
        if tag == "lrauto":
            seeds = [r["macro_f1"] for r in panel if r["method"] == "lora" and r["dataset"] == dataset]
            assert cells[4] == f"{statistics.mean(seeds):.3f}", line
    assert len(groups) >= 5


HEAD_INIT_METHODS = {"lora-headinit": ("lora", "--head-init probe"),
                     "last-two-layers-headinit": ("last-two-layers", "--head-init probe"),
                     "lora-headinit-lr4e-3": ("lora", "--head-init probe --lr 4e-3"),
                     "lora-r16a32probe": ("lora", "--head-init probe --rank 16 --alpha 32")}
"""The panel method of each `--head-init` study in results/recipe_headinit/, its strategy and flags."""


def test_head_init_table_is_the_committed_runs():
    """docs/recipe.md's `--head-init probe` table: each row's macro-F1 per seed and mean are
    results/recipe_headinit's, and the default's mean beside it is results/panel's."""
    import statistics

    doc = (ROOT / "docs" / "recipe.md").read_text()
    panel = json.loads((ROOT / "results" / "panel" / "panel.json").read_text())["records"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted((ROOT / "results" / "recipe_headinit").glob("*/panel.json")):
        for r in json.loads(path.read_text())["records"]:
            groups.setdefault((r["method"], r["dataset"]), []).append(r)
    for (method, dataset), runs in groups.items():
        strategy, flags = HEAD_INIT_METHODS[method]
        f1 = [r["macro_f1"] for r in sorted(runs, key=lambda r: r["seed"])]
        default = [r["macro_f1"] for r in panel if r["method"] == strategy and r["dataset"] == dataset]
        row = (f"| `{flags}` | {strategy} | {dataset} | {' / '.join(f'{x:.3f}' for x in f1)} | "
               f"{statistics.mean(f1):.3f} | {statistics.mean(default):.3f} |")
        assert row in doc, f"docs/recipe.md's --head-init table lacks {row}"
    assert len(groups) >= 10


def test_performance_padding_table_matches_results():
    """Each row of the docs/performance.md's pad-multiple table is the measurement in results/padding/padding.json."""
    runs = json.loads((ROOT / "results" / "padding" / "padding.json").read_text())["runs"]
    measured = {(r["strategy"], r["pad_multiple"]): r for run in runs for r in run["rows"]}
    rows = re.findall(r"^\| (full|lora|last-two-layers) \| \**(\d+)\** \| \**([\d.]+)\** \| \**([\d,]+) MB\** \|"
                      r" ([\d.-]+) \| ([\d.]+) \|$", PERF.read_text(), re.M)
    assert len(rows) == 8
    for strategy, mult, speed, mem, eff, acc in rows:
        r = measured[(strategy, int(mult))]
        assert speed == f"{r['train_samples_per_s']:.1f}" and mem == f"{r['peak_memory_mb']:,.0f}"
        assert acc == f"{r['test_accuracy']:.3f}" and eff in ("-", f"{r['padding_efficiency']:.3f}")


TUNED_PEER_ROW = re.compile(r"^\| (full|lora|last-two-layers) \| ([\d.]+) / ([\d.]+) / ([\d.]+) \| ([\d.]+)x \| "
                            r"([\d.]+)x \| (\d+) / (\d+) / (\d+) \| ([\d,]+) / ([\d,]+) / ([\d,]+) \| "
                            r"([\d.]+) / ([\d.]+) / ([\d.]+) \((\d) seeds?(?:; typical peer (\d))?\)", re.M)
TUNED_PEER_TABLES = {"### The first-token setting: issue 17's acceptance run": "bench_zen5/bench.json"}
"""Where each table against both peers in docs/performance.md begins, and the results file it is."""


def table_after(text: str, marker: str) -> str:
    """The first markdown table after `marker` in `text` (its lines, joined)."""
    assert text.count(marker) == 1, marker
    lines = text[text.index(marker):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[first:end])


def test_performance_tuned_peer_tables_match_results():
    """Each row of each docs/performance.md table against both peers is the measurement in its results file, and
    every such row in the docs/performance.md is in one of those tables."""
    readme = PERF.read_text()
    assert len(TUNED_PEER_ROW.findall(readme)) == sum(
        len(TUNED_PEER_ROW.findall(table_after(readme, m))) for m in TUNED_PEER_TABLES)
    for marker, name in TUNED_PEER_TABLES.items():
        rows = {r["strategy"]: r for r in json.loads((ROOT / "results" / name).read_text())["rows"]}
        found = TUNED_PEER_ROW.findall(table_after(readme, marker))
        assert found and sorted(f[0] for f in found) == sorted(rows), name
        for strategy, *cells in found:
            r = rows[strategy]
            who = (r["lorafit"], r["peer_tuned"], r["peer"])
            assert cells[0:3] == [f"{x['samples_per_s']:.1f}" for x in who]
            assert abs(float(cells[3]) - r["ratios"]["tuned"]["samples_per_s"]) < 0.0051
            assert abs(float(cells[4]) - r["ratios"]["typical"]["samples_per_s"]) < 0.0051
            assert [int(c) for c in cells[5:8]] == [round(x["train_seconds"] + x["test_seconds"]) for x in who]
            assert cells[8:11] == [f"{x['peak_memory_mb']:,.0f}" for x in who]
            acc = r["test_accuracy_per_seed"]
            means = [sum(acc[k]) / len(acc[k]) for k in ("lorafit", "peer_tuned", "peer_typical")]
            assert all(abs(float(c) - m) < 5e-5 for c, m in zip(cells[11:14], means))
            assert int(cells[14]) == len(r["seeds"]) == len(acc["lorafit"]) == len(acc["peer_tuned"])
            assert int(cells[15] or cells[14]) == len(acc["peer_typical"])


DEFAULTS_ROW = re.compile(r"^\| (full|lora|last-two-layers) \| ([\d.]+) / ([\d.]+) \| ([\d.]+)x \| ([\d.]+x|-) \| "
                          r"(\d+) / (\d+) \| ([\d.]+)x \| ([\d,]+) / ([\d,]+) \| ([\d.]+) / ([\d.]+) \|$", re.M)


def test_performance_defaults_table_matches_results():
    """Documentation consistency: docs/performance.md's table of lorafit's defaults against the tuned peer is
    results/bench/bench.json, every strategy, every cell."""
    table = table_after(PERF.read_text(), "### The current run: lorafit's defaults against the tuned peer")
    report = json.loads((ROOT / "results" / "bench" / "bench.json").read_text())
    rows = {r["strategy"]: r for r in report["rows"]}
    found = DEFAULTS_ROW.findall(table)
    assert sorted(f[0] for f in found) == sorted(rows) == ["full", "last-two-layers", "lora"]
    for strategy, *cells in found:
        r = rows[strategy]
        ours, peer, q = r["lorafit"], r["peer_tuned"], r["ratios"]["tuned"]
        assert ours["pooling"] == "mean" and report["slice"]["pooling"] == "None"  # lorafit on its defaults
        assert cells[0:2] == [f"{x['samples_per_s']:.1f}" for x in (ours, peer)]
        assert cells[2] == f"{q['samples_per_s']:.2f}"
        assert cells[3] == (f"{q['best_epoch_samples_per_s']:.2f}x" if "best_epoch_samples_per_s" in q else "-")
        assert [int(c) for c in cells[4:6]] == [round(x["process_seconds"]) for x in (ours, peer)]
        assert cells[6] == f"{q['whole_process_time_peer_over_lorafit']:.2f}"
        assert cells[7:9] == [f"{x['peak_memory_mb']:,.0f}" for x in (ours, peer)]
        assert cells[9:11] == [f"{x['test_accuracy']:.3f}" for x in (ours, peer)]


@pytest.mark.parametrize("doc, name, n", [("README.md", "default_compare", 3),
                                          ("docs/full-scale.md", "full_scale", 3),
                                          ("docs/full-scale.md", "full_scale_mean", 2),
                                          ("docs/performance.md", "default_compare_cls", 3)])
def test_compare_tables_are_the_committed_reports(doc, name, n):
    """A comparison table in the docs is the committed compare report, row for row."""
    text = (ROOT / doc).read_text()
    report = (ROOT / "results" / name / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| (full|lora|last-two-layers) \|", line)]
    assert len(rows) == n, name
    for row in rows:
        assert row in text, f"{doc} lacks results/{name}/report.md row: {row}"


def test_readme_peak_is_the_committed_comparisons():
    """The matmul peak beside the README's times is the one its comparison measured (report.json)."""
    machine = json.loads((ROOT / "results" / "default_compare" / "report.json").read_text())["machine"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (f"matmul peak at {machine['bf16_tflops']:.2f} TFLOP/s in bf16 and {machine['fp32_tflops']:.2f} in fp32"
            in readme)
    final = json.loads((ROOT / "results" / "default_compare" / "lora" / "final.json").read_text())
    family_model = machine["cpu"].split("(")[-1].rstrip(")")  # "family 6, model 167"
    assert machine["cpu"] == final["cpu"]
    assert f"({family_model}; `--precision auto` chose {final['precision']}" in readme


def test_full_scale_probe_accuracies_are_the_committed_probes():
    """The probe's test accuracies in docs/full-scale.md are results/probe/probe_mean.json and probe_cls.json."""
    readme = (ROOT / "docs" / "full-scale.md").read_text()
    for pooling in ("mean", "cls"):
        probe = json.loads((ROOT / "results" / "probe" / f"probe_{pooling}.json").read_text())
        assert probe["sizes"] == {"train": 22500, "validation": 2500, "test": 25000}
        assert f"probe, {pooling}: {probe['test_accuracy']:.4f}" in readme, pooling


def test_cli_sweep_table_is_the_committed_sweep_report():
    """docs/cli.md's sweep table is results/sweep/report.md, row for row, and its figure is there."""
    readme = (ROOT / "docs" / "cli.md").read_text()
    report = (ROOT / "results" / "sweep" / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| `\d+` \|", line)]
    assert len(rows) == 10
    for row in rows:
        assert row in readme, f"docs/cli.md lacks results/sweep/report.md row: {row}"
    assert (ROOT / "results" / "sweep" / "report.png").stat().st_size > 10_000
    assert "(../results/sweep/report.png)" in readme


def test_performance_interleaved_table_matches_results():
    """Each row of docs/performance.md's interleaved-steps table is the measurement in
    results/interleaved/interleaved.json."""
    measured = json.loads((ROOT / "results" / "interleaved" / "interleaved.json").read_text())
    rows = {r["strategy"]: r for r in measured["rows"]}
    found = re.findall(r"^\| (full|lora) \| ([\d.]+) / ([\d.]+) / ([\d.]+) \| ([\d.]+)x; ([\d.]+)x \| "
                       r"([\d.]+)x; ([\d.]+)x \|$", PERF.read_text(), re.M)
    assert found and sorted(f[0] for f in found) == sorted(rows)
    for strategy, *cells in found:
        r = rows[strategy]
        assert cells[0:3] == [f"{r[k]['samples_per_s']:.2f}" for k in ("lorafit", "tuned", "typical")]
        for i, kind in ((3, "over_tuned"), (5, "over_typical")):
            assert cells[i:i + 2] == [f"{r[kind]['samples_per_s']:.2f}", f"{r[kind]['median_of_round_ratios']:.2f}"]
        assert len(r["lorafit"]["step_seconds"]) == r["rounds"]  # every timed round is in the record


def test_performance_fp32_padding_tables_match_results():
    """The docs/performance.md's fp32 pad-multiple table is results/padding/padding_fp32.json, and its interleaved
    steps table is results/padding/padding_interleaved.json."""
    runs = json.loads((ROOT / "results" / "padding" / "padding_fp32.json").read_text())["rows"]
    text = PERF.read_text()
    found = re.findall(r"^\| (full|lora) \| (\d+) \| ([\d.]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [(f[0], int(f[1])) for f in found] == [(r["strategy"], r["pad_multiple"]) for r in runs]
    for (_, _, speed, mem, eff, acc), r in zip(found, runs):
        assert (speed, mem, eff, acc) == (f"{r['train_samples_per_s']:.1f}", f"{r['peak_memory_mb']:,.0f}",
                                          f"{r['padding_efficiency']:.3f}", f"{r['test_accuracy']:.3f}")
    inter = json.loads((ROOT / "results" / "padding" / "padding_interleaved.json").read_text())["rows"]
    found = re.findall(r"^\| (full|lora) \| (\d+) / (\d+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+)x; ([\d.]+)x \|$",
                       text, re.M)
    assert [f[0] for f in found] == [r["strategy"] for r in inter]
    for (_, a, b, la, lb, tot, med), r in zip(found, inter):
        per, ratio = r["per_multiple"], r["speedup_over_first"][b]
        assert list(per) == [a, b]  # the first multiple is the base of the ratio
        assert (la, lb) == tuple(f"{per[m]['mean_padded_length']:.1f}" for m in (a, b))
        assert (tot, med) == (f"{ratio['of_totals']:.3f}", f"{ratio['median_of_rounds']:.3f}")
        assert all(len(per[m]["step_seconds"]) == r["rounds"] for m in (a, b))


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_and_cited_result_exists(doc):
    """Relative links resolve, and every `results/...` path a page cites is in the repository (older
    results are cited as `git show COMMIT:results/...`, which this skips)."""
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" not in target:
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
    for cited in re.findall(r"(?<![:\w/.])results/[\w./-]*\w", text):
        found = (ROOT / cited).exists() or any((ROOT / cited).parent.glob((ROOT / cited).name + ".*"))
        assert found, f"{doc.name} cites missing {cited}"  # a --results prefix names its .json/.md


def test_readme_stays_short():
    """The README is the newcomer's page; measurements and references live in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_serve_load_table_and_goals_are_the_committed_run():
    """docs/serve.md's load table and goal ratios are results/serve_load/serve_load.json's medians."""
    doc = (ROOT / "docs" / "serve.md").read_text()
    run = json.loads((ROOT / "results" / "serve_load" / "serve_load.json").read_text())
    assert f"at {run['commit']}," in doc
    labels = {"lorafit-1": "| lorafit | 1 |", "lorafit": "| lorafit | 16 |",
              "peft": "| PEFT, `adapter_names=` mixed batches | 16 |", "merged": "| 16 merged models | 16 |",
              "threaded": "| lorafit, the updates on both threads | 16 |"}
    assert set(run["results"]) == set(labels)
    for system, label in labels.items():
        r = run["results"][system]
        by = r["by_concurrency"]
        speeds = " / ".join(f"{by[c]['texts_per_s']:.1f}" for c in ("1", "8", "32"))
        row = f"{label} {speeds} | {by['32']['p99_ms']:,.0f} | {r['peak_rss_mb']:,.0f} |"
        assert row in doc, f"docs/serve.md lacks {row}"
    for key, words in (("lorafit_16_over_1", "against one adapter: "), ("lorafit_16_over_peft", "against PEFT: "),
                       ("lorafit_16_over_threaded", "The updates on one thread against both: ")):
        ratios = " / ".join(f"{run['ratios'][key][c]['median']:.2f}x" for c in ("1", "8", "32"))
        assert f"{words}{ratios}" in doc, (key, ratios)



def _criteria_lines(*panels, borrowed=()):
    import sys

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from panel import checked_records, criteria_lines

    lines = criteria_lines(checked_records(list(panels), list(borrowed)))
    majority = [line for line in lines if "above the majority" in line]
    held = sum(line.startswith("holds") for line in majority)
    return [line for line in lines if line not in majority], f"{held} of {len(majority)} lines of the form"


def test_recipe_criteria_blocks_are_what_panel_check_prints():
    """The criteria docs/recipe.md prints for the panel and for the second encoder are `panel.py --check`'s
    lines on the committed results, every one of them."""
    doc = (ROOT / "docs" / "recipe.md").read_text()
    panel = ROOT / "results" / "panel" / "panel.json"
    lora = ROOT / "results" / "panel_lora" / "panel.json"
    mpnet = sorted((ROOT / "results" / "panel_mpnet").rglob("panel.json"))
    mpnet_today = sorted((ROOT / "results" / "panel_mpnet_all").rglob("panel.json"))
    others = ("majority", "tfidf-lr", "probe", "full", "last-two-layers")
    # the second encoder's lora at today's default, against its own full rows and results/panel's references
    for lines, majority in (_criteria_lines(lora, borrowed=[([panel], others)]),
                            _criteria_lines(*mpnet_today, borrowed=[([panel], ("majority", "tfidf-lr")),
                                                                    (mpnet, ("full",))])):
        assert lines
        block = "```\n" + "\n".join(lines) + "\n```\n\nand " + majority
        assert block in doc, f"docs/recipe.md lacks the block:\n{block}"


def test_second_encoder_readme_lists_every_subset_with_its_commit():
    """results/panel_mpnet/README.md has a row per committed subset folder, naming the commit its panel.json
    records and the datasets and seeds it holds."""
    folder = ROOT / "results" / "panel_mpnet"
    rows = (folder / "README.md").read_text().splitlines()
    for panel in sorted(folder.rglob("panel.json")):
        made = json.loads(panel.read_text())
        name = "`.`" if panel.parent == folder else f"`{panel.parent.name}/`"
        row = next((line for line in rows if line.startswith(f"| {name}")), None)
        assert row, f"results/panel_mpnet/README.md has no row for {name}"
        assert made["commit"] in row, (name, made["commit"], row)
        for dataset in {r["dataset"] for r in made["records"]}:
            assert dataset in row, (name, dataset, row)
        seeds = sorted({r["seed"] for r in made["records"]})
        assert f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" in row, (name, seeds, row)


def test_second_encoder_table_is_the_committed_runs():
    """docs/recipe.md's MPNet table: lora's cells are today's default's records (MPNet: results/panel_mpnet_all,
    MiniLM: results/panel_lora), full's results/panel_mpnet's and results/panel's, the references results/panel's,
    of the same dataset and seed; every MPNet subset committed is in it, at both defaults."""
    doc = (ROOT / "docs" / "recipe.md").read_text()

    def records(*files):
        return {(r["dataset"], r["seed"], r["method"]): r for f in files
                for r in json.loads(f.read_text())["records"]}

    mpnet = records(*sorted((ROOT / "results" / "panel_mpnet").rglob("panel.json")))
    today = records(*sorted((ROOT / "results" / "panel_mpnet_all").rglob("panel.json")))
    minilm = records(ROOT / "results" / "panel" / "panel.json")
    minilm_today = records(ROOT / "results" / "panel_lora" / "panel.json")
    pairs = sorted({(d, seed) for d, seed, _ in mpnet})
    assert len(pairs) == 12 and pairs == sorted({(d, seed) for d, seed, _ in today})
    assert all(r["lr"] == 1e-3 for recs in (today, minilm_today) for r in recs.values())
    columns = [(today, "lora"), (mpnet, "full"), (minilm_today, "lora"), (minilm, "full"), (minilm, "tfidf-lr"),
               (minilm, "probe"), (minilm, "majority")]
    for dataset, seed in pairs:
        for label, key in (("accuracy", "accuracy"), ("macro-F1", "macro_f1")):
            cells = " | ".join(f"{recs[(dataset, seed, method)][key]:.3f}" for recs, method in columns)
            head = f"| {dataset} seed {seed}: {label} |"
            row = next((line for line in doc.splitlines() if line.startswith(head)), None)
            assert row and row.replace("**", "") == f"{head} {cells} |", (head, cells)


def test_second_encoder_at_todays_default_table_is_the_committed_subsets():
    """docs/recipe.md's table of MPNet lora at today's default: a row per subset of
    results/panel_mpnet_all (its macro-F1, accuracy and seconds of training), beside the
    key-and-value default's and full's macro-F1 (results/panel_mpnet) and TF-IDF's (results/panel)."""
    doc = (ROOT / "docs" / "recipe.md").read_text()

    def records(*files):
        return {(r["dataset"], r["seed"], r["method"]): r for f in files
                for r in json.loads(f.read_text())["records"]}

    today = records(*sorted((ROOT / "results" / "panel_mpnet_all").rglob("panel.json")))
    earlier = records(*sorted((ROOT / "results" / "panel_mpnet").rglob("panel.json")))
    minilm = records(ROOT / "results" / "panel" / "panel.json")
    assert today and all(method == "lora" and r["lr"] == 1e-3 for (_, _, method), r in today.items())
    lines = [line for line in doc.splitlines() if line.startswith("| ") and " seed " in line.split("|")[1]
             and line.count("|") == 8]
    for (dataset, seed, _), r in today.items():
        beside = [earlier[(dataset, seed, "lora")], earlier[(dataset, seed, "full")],
                  minilm[(dataset, seed, "tfidf-lr")]]
        want = (f"| {dataset} seed {seed} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | "
                + " | ".join(f"{b['macro_f1']:.3f}" for b in beside) + f" | {r['train_seconds']:.0f} |")
        assert want in lines, want
    assert len(lines) == len(today)


VARIANT_TABLES = {  # results folder -> (its section in docs/recipe.md, where that ends, the majority's panel, folders)
    "variants_pooler": ("**The LoRA variants at today's defaults**", "**The LoRA variants at 256 tokens",
                        "panel_pooler", 8),
    "variants_default": ("**The LoRA variants at 256 tokens", "**The LoRA variants on the earlier", "panel", 8),
}


@pytest.mark.parametrize("folder", sorted(VARIANT_TABLES))
def test_recipe_variants_tables_are_the_committed_runs(folder):
    """docs/recipe.md's tables of the LoRA variants at a default: per folder of results/`folder`,
    its seeds' macro-F1 and how many are over 5 points above the majority class's."""
    start, end, panel, count = VARIANT_TABLES[folder]
    doc = (ROOT / "docs" / "recipe.md").read_text()
    section = doc[doc.index(start):doc.index(end)]
    majority = {r["dataset"]: r["macro_f1"] for r in json.loads((ROOT / "results" / panel / "panel.json").read_text())
                ["records"] if r["method"] == "majority"}
    folders = sorted((ROOT / "results" / folder).glob("*/panel.json"))
    assert len(folders) == count
    for path in folders:
        dataset, variant = path.parent.name.split("-")
        records = sorted(json.loads(path.read_text())["records"], key=lambda r: r["seed"])
        f1 = [r["macro_f1"] for r in records]
        learns = sum(x > majority[dataset] + 0.05 for x in f1)
        row = next((line for line in section.splitlines() if line.startswith(f"| {dataset} | {variant} |")), None)
        assert row, f"no row for {dataset} {variant}"
        assert " / ".join(f"{x:.3f}" for x in f1) in row and f"| {learns} of {len(f1)} |" in row, row
