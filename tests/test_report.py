"""The comparison table names the epoch whose weights were tested, with that epoch's validation accuracy."""

from __future__ import annotations

from lorafit.report import compare_rows, markdown_table


def _result(**final_extra) -> dict:
    history = [{"val_accuracy": acc, "samples_per_s": 10.0, "seconds": 5.0} for acc in (0.9, 0.7, 0.8)]
    final = {"test_accuracy": 0.85, "test_f1": 0.84, "best_val_accuracy": 0.9, "best_epoch": 1,
             "trainable_params": 10, "total_params": 100, "trainable_pct": 10.0, "train_seconds": 15.0,
             "wall_seconds": 20.0, "peak_memory_mb": 1000.0, "saved_bytes": 2000, "lr": 1e-3, **final_extra}
    return {"final": final, "history": history}


def test_row_shows_the_tested_epoch():
    rows = compare_rows({"lora": _result(kept_epoch=3), "full": _result()})
    assert (rows[0]["kept_epoch"], rows[0]["kept_val_accuracy"]) == (3, 0.8)
    # a run from before --keep tested its best-validation epoch
    assert (rows[1]["kept_epoch"], rows[1]["kept_val_accuracy"]) == (1, 0.9)
    md = markdown_table(rows)
    assert "val acc (epoch tested)" in md
    # a run from before macro-F1 was recorded shows none
    assert "| lora | 0.8500 | - | 0.8400 | 0.8000 (3) |" in md and "| full | 0.8500 | - | 0.8400 | 0.9000 (1) |" in md
    assert "| lora | 0.8500 | 0.6100 | 0.8400 |" in markdown_table(compare_rows({"lora": _result(test_macro_f1=0.61)}))
    assert rows[0]["samples_per_s"] == 10.0
