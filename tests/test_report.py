from cyclemerge.config import Config
from cyclemerge.evaluate import method_table
from cyclemerge.report import band_position, endpoint_band, params_from_config, render_summary, short_table


def context():
    results = {
        "endpoint_0": {"test": {"acc": 0.9012, "loss": 0.31}, "train": {"acc": 0.95, "loss": 0.2}},
        "endpoint_1": {"test": {"acc": 0.8988, "loss": 0.33}, "train": {"acc": 0.94, "loss": 0.21}},
        "naive": {"test": {"acc": 0.1, "loss": 2.3}},
        "c2m3+gates+repair": {"test": {"acc": 0.85, "loss": 0.45}, "train": {"acc": 0.88, "loss": 0.4}},
    }
    curve = {"lambdas": [0.0, 0.5, 1.0], "acc": [0.9, 0.3, 0.9], "loss": [0.3, 2.5, 0.3], "barrier": 2.2}
    return {
        "params": params_from_config(Config()),
        "rows": method_table(results, endpoints=["endpoint_0", "endpoint_1"]),
        "figures": {"Interpolation": "plots/interpolation.png", "Gates": "plots/gates.png"},
        "report_dir": "reports",
        "timings": {"train": 12.5, "align": 3.25},
        "alignment": {"method": "c2m3", "final objective": 123.456789, "iterations": 17, "cycle-consistent": True},
        "cycle": {
            "pairwise": {"distance": 0.8123, "cosine": 0.31, "fixed_fraction_mean": 0.05, "path_min_acc": 0.3,
                         "path_max_loss": 2.5, "curve": curve},
        },
        "notes": ["model 3 dropped: weight norm outlier"],
    }


def test_summary_has_table_rows_links_and_timings():
    text = render_summary(context())
    assert "| endpoint_0 (endpoint) | 90.12 | 0.3100 | 95.00 | 0.2000 | – |" in text
    assert "| **endpoint mean** | 90.00 | 0.3200 | 94.50 | 0.2050 | – |" in text
    assert "| naive | 10.00 | 2.3000 | – | – | -80.00 |" in text
    assert "| c2m3+gates+repair | 85.00 | 0.4500 | 88.00 | 0.4000 | -5.00 |" in text
    assert "![Interpolation](../plots/interpolation.png)" in text
    assert "![Gates](../plots/gates.png)" in text
    assert "| align | 3.2 |" in text and "| **total** | 15.8 |" in text
    assert "| pairwise | 0.8123 | 0.3100 | 5.0 | 30.00 | 2.5000 | 2.2000 |" in text
    assert "- **final objective**: 123.457" in text and "- **cycle-consistent**: yes" in text
    assert "- model 3 dropped: weight norm outlier" in text
    assert "mean 90.00%" in text


def test_summary_params_come_from_the_config():
    cfg = Config()
    text = render_summary({"params": params_from_config(cfg)})
    assert f"- **dataset**: {cfg.data.name}" in text
    assert f"- **repair method**: {cfg.repair.method}" in text
    assert f"{cfg.train.num_models} (seeds {cfg.train.model_seeds()})" in text
    assert f"{cfg.gates.granularity} granularity" in text
    off = cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"enabled": False})})
    assert params_from_config(off)["gates"] == "off"


def test_summary_skips_missing_sections():
    text = render_summary({})
    assert text.startswith("# cyclemerge run summary")
    assert "## Comparison" not in text and "## Figures" not in text


def test_short_table_is_fixed_width():
    text = short_table(context())
    lines = text.rstrip("\n").split("\n")
    assert lines[0].split() == ["method", "test", "acc", "test", "loss", "train", "acc", "train", "loss"]
    assert len({len(line) for line in lines}) == 1, "every line has the same width"
    assert any(line.startswith("c2m3+gates+repair") and "85.00%" in line and "0.4500" in line for line in lines)
    assert any(line.startswith("naive") and line.rstrip().endswith("–") for line in lines)
    assert short_table({}) == "(no results)\n"


def test_methods_are_placed_against_the_endpoints_band():
    rows = context()["rows"] + [{"method": "soft merge", "kind": "method", "test_acc": 0.9020, "test_loss": 0.3},
                                {"method": "inside", "kind": "method", "test_acc": 0.9000, "test_loss": 0.3}]
    assert endpoint_band(rows) == (0.8988, 0.9012)
    assert [band_position(v, (0.8988, 0.9012)) for v in (0.8988, 0.9012, 0.9013, 0.8)] == \
        ["inside", "inside", "above", "below"]
    text = render_summary({"rows": rows})
    assert "| vs endpoints' band (test) |" in text
    assert "| naive | 10.00 | 2.3000 | – | – | -80.00 | below (-79.88 under the worst) |" in text
    assert "| soft merge | 90.20 | 0.3000 | – | – | +0.20 | above (+0.08 over the best) |" in text
    assert "| inside | 90.00 | 0.3000 | – | – | +0.00 | inside |" in text
    assert "| endpoint_0 (endpoint) | 90.12 | 0.3100 | 95.00 | 0.2000 | – | – |" in text
    assert "Endpoints' band (test accuracy, worst to best endpoint): 89.88–90.12%." in text
    assert "- above the band: soft merge 90.20" in text and "- inside the band: inside 90.00" in text
    assert "- below the band: naive 10.00; c2m3+gates+repair 85.00" in text


def test_validation_columns_appear_only_when_evaluated():
    assert "validation" not in render_summary(context()) and "val acc" not in short_table(context())
    rows = [dict(r, validation_acc=0.5, validation_loss=1.0) for r in context()["rows"]]
    text = render_summary({"rows": rows})
    assert "| method | test acc (%) | test loss | validation acc (%) | validation loss | train acc (%) |" in text
    assert "| naive | 10.00 | 2.3000 | 50.00 | 1.0000 | – | – | -80.00 |" in text
    assert "val acc" in short_table({"rows": rows})
