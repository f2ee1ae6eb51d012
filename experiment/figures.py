"""Figures of the results: matplotlib on its Agg canvas (no display, no pyplot state), shared by the results report
(`scripts/collect_results.py`), the engram analysis (`experiment/analysis.py`) and the W&B images a run logs at its
end (`RunFigures`, added by the CLI with `logger=wandb`).

What is here:
- `PAPER`: the paper's approximate numbers (experiments.md §e.1-§e.3), labelled "paper (approx.)" wherever drawn;
- `setting_of(config)`: the setting columns of a run (length, segment, training size, steps, precision);
- `sorting_figure`: accuracy against sequence length per model for one segment size, the memory-less line dashed,
  the paper's points as markers;
- `learning_curve_figure`: a validation metric against the optimizer step, one line per run or model;
- `RunFigures`: a Lightning callback that draws one run's figures at the end of its test and logs them as W&B
  images (`log_image` of the W&B logger); the PNGs also stay in `<run dir>/figures/`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

PAPER_LABEL = "paper (approx.)"

# The paper's numbers as experiments.md §e gives them, with its caveats. Sorting: accuracy on the 20 targets at
# L = 32000 with segment 1024 (§e.2: Memoria 63.42-65%, the baselines about 32-33%, the ∞-former 32-39.71%).
PAPER = {
    "sorting": [  # (model, length, segment, low, high)
        ("memoria_gpt2", 32000, 1024, 0.6342, 0.65),
        ("transformer_xl", 32000, 1024, 0.32, 0.33),
        ("compressive", 32000, 1024, 0.32, 0.33),
        ("infinity_former", 32000, 1024, 0.32, 0.3971),
    ],
    # language modelling (§e.1): test perplexity on GPT-2 tokens (enwik8: bpc); the paper's form is the
    # reference's mean of per-batch perplexities (experiments.md §c.1), our ppl_mean_of_batches
    "wikitext103": {"memoria_gpt2": 23.471, "transformer_xl": 24.543, "compressive": 24.794,
                    "infinity_former": 24.685},
    "wikitext103_seg50": {"memoria_gpt2": 30.01, "infinity_former": 31.79},
    "pg19": {"memoria_gpt2": 29.149, "infinity_former": 29.154},
    "enwik8": {"memoria_gpt2": 1.16, "compressive": 1.16},
    # classification (§e.3): Hyperpartisan test macro-F1, mean of 5 runs
    "hyperpartisan": {"memoria_roberta": 96.51, "roberta": 95.24},
}


def base_model(name: str) -> str:
    """A model config's family: `memoria_gpt2_sort` -> `memoria_gpt2` (the suffixes _sort_cpu, _sort, _enwik8,
    _tiny)."""
    for suffix in ("_sort_cpu", "_sort", "_enwik8", "_tiny"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def setting_of(config: dict[str, Any]) -> dict[str, Any]:
    """The setting of a run from its resolved config: length and segment (sorting) or segment length and lanes
    (language modelling), training size, training length (max_steps, else max_epochs) and precision."""
    task = config.get("task") or {}
    data, module = task.get("data") or {}, task.get("module") or {}
    trainer = config.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    steps = f"{max_steps} steps" if max_steps not in (None, -1) else f"{trainer.get('max_epochs')} epochs"
    out: dict[str, Any] = {}
    if "length" in data:  # sorting
        out["length"] = data.get("length")
        out["segment"] = module.get("segment_size")
        out["train size"] = data.get("num_train")
    else:
        out["segment"] = data.get("segment_length")
        out["lanes"] = data.get("lanes")
        limit = trainer.get("limit_train_batches")
        out["train size"] = "all" if limit in (None, 1.0) else f"limit {limit}"
    out["training"] = steps
    out["precision"] = str(trainer.get("precision", "32-true"))
    return out


# --------------------------------------------------------------------------------------------------------------
# canvas
def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] | None = None):
    """(figure, axes) on an Agg canvas; axes is one Axes for 1 x 1, else a 2-D array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size or (6.4, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, (axes[0][0] if rows == cols == 1 else axes)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write the figure as a PNG with a 64-colour palette (line plots look the same at a third of the size, so the
    figures are small enough to commit), to a temp name, then renamed: no half-written file. Returns the path."""
    import io

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=64)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="png", optimize=True)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# report figures
MODEL_COLORS = {"memoria_gpt2": "C0", "gpt2": "C1", "transformer_xl": "C2", "compressive": "C3",
                "infinity_former": "C4"}


def model_color(model: str, k: int = 0) -> str:
    """One colour per model family, the same in every figure (others take the colours after them)."""
    return MODEL_COLORS.get(base_model(model.split(" ")[0]), f"C{5 + k % 5}")


def sorting_figure(groups: list[dict[str, Any]], segment: Any, title: str = ""):
    """Accuracy against length for one segment size. groups: dicts with `model`, `length`, `mean`, `std`, `n` and
    optionally `memoryless` (the memory-less line of that setting). One line per model (error bars: std over
    seeds), the memory-less line dashed (a property of the test examples, so one line: the mean over the groups
    at each length), the paper's points (same segment) as hollow markers."""
    fig, ax = new_figure()
    models = sorted({g["model"] for g in groups})
    for k, model in enumerate(models):
        rows = sorted((g for g in groups if g["model"] == model), key=lambda g: g["length"])
        ax.errorbar([g["length"] for g in rows], [100 * g["mean"] for g in rows],
                    yerr=[100 * (g["std"] or 0) for g in rows], marker="o", capsize=3, label=model,
                    color=model_color(model, k))
    free: dict[Any, list[float]] = {}
    for g in groups:
        if g.get("memoryless") is not None:
            free.setdefault(g["length"], []).append(g["memoryless"])
    if free:
        lengths = sorted(free)
        ax.plot(lengths, [100 * sum(free[x]) / len(free[x]) for x in lengths], ls="--", color="black", alpha=0.7,
                label="memory-less line")
    paper = [p for p in PAPER["sorting"] if str(p[2]) == str(segment)]
    for k, (model, length, _, low, high) in enumerate(paper):  # a range: the sources disagree (experiments.md §e.2)
        mid = 100 * (low + high) / 2
        ax.errorbar([length], [mid], yerr=[[mid - 100 * low], [100 * high - mid]], marker="D", mfc="none",
                    color=model_color(model, k), capsize=4, ls="none", label=f"{PAPER_LABEL}: {model}")
    lengths = [g["length"] for g in groups] + [p[1] for p in paper]
    if lengths and max(lengths) / max(min(lengths), 1) > 20:
        ax.set_xscale("log")
    ax.set(xlabel="sequence length L", ylabel="test accuracy on the 20 targets (%)",
           title=title or f"Sorting, segment {segment}")
    ax.legend(fontsize=7)
    return fig


def learning_curve_figure(curves: dict[str, list[tuple[float, float]]], metric: str, title: str = ""):
    """One line per label: the (step, value) points of `metric`."""
    fig, ax = new_figure()
    for label, points in sorted(curves.items()):
        points = sorted(p for p in points if p[1] is not None and math.isfinite(p[1]))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)  # default colours
    ax.set(xlabel="optimizer step", ylabel=metric, title=title or f"{metric} during training")
    if curves:
        ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------------------
# one run's figures, logged as W&B images at the end of its test
class RunFigures(Callback):
    """Draws the run's figures when its test ends and logs them with every logger that has `log_image` (the W&B
    logger): the learning curve of the monitored validation metric, and for sorting the test accuracy beside its
    memory-less line (the report's sorting figure for this one run). The PNGs go to `<run dir>/figures/`."""

    def __init__(self, run_dir: str | Path, task: str, model: str, monitor: str, setting: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.task, self.model, self.monitor, self.setting = task, model, monitor, setting
        self.curve: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.curve.append((int(trainer.global_step), float(value)))

    def figures(self, test_metrics: dict[str, float]) -> dict[str, Path]:
        """Draw and save this run's figures; returns {name: PNG path}."""
        out = self.run_dir / "figures"
        paths = {}
        if self.curve:
            fig = learning_curve_figure({self.model: self.curve}, self.monitor, f"{self.task} / {self.model}")
            paths["learning_curve"] = save_figure(fig, out / "learning_curve.png")
        acc = test_metrics.get("test/acc-final")
        if self.task == "sorting" and acc is not None:
            group = {"model": self.model, "length": self.setting.get("length"), "mean": acc, "std": 0.0, "n": 1,
                     "memoryless": test_metrics.get("test/memoryless-acc")}
            fig = sorting_figure([group], self.setting.get("segment"))
            paths["sorting_accuracy"] = save_figure(fig, out / "sorting_accuracy.png")
        return paths

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        paths = self.figures(metrics)
        loggers = trainer.loggers or []
        for name, path in paths.items():
            for logger in loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"figures/{name}", images=[str(path)], step=int(trainer.global_step))


def figure_callbacks(cfg: Any, run_dir: str | Path, resolved: dict[str, Any]) -> list[Callback]:
    """[RunFigures] when the run logs to W&B (`logger.kind` wandb, or a list holding it), else []."""
    kind = (cfg.get("logger") or {}).get("kind")
    kinds = [kind] if isinstance(kind, str) or kind is None else list(kind)
    if "wandb" not in kinds:
        return []
    return [RunFigures(run_dir, cfg.task.name, cfg.model.name, cfg.task.monitor, setting_of(resolved))]
