"""In-silico perturbation with a trained ST model -> AnnData in cell-eval's format.

Prediction never reads real perturbed cells: the number of predicted cells per perturbation comes
from ``n_cells`` or from the control cells used. The output holds the predicted cells plus the
context's real control cells (obs perturbation = control label), var_names = the model's genes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import write_elem

from statecore.data.sets import RowGatherer, gene_indices, obs_labels
from statecore.errors import DataError
from statecore.runs.files import atomic_output
from statecore.training.tracks import get_track

SETS_PER_FORWARD = 16


def control_rows(adata, context: str, control: str, control_cells=None) -> np.ndarray:
    """Row indices of the control cells to perturb: ``control_cells`` (indices or bool mask) or every
    control of ``context``."""
    if control_cells is not None:
        rows = np.asarray(control_cells)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        if rows.size == 0:
            raise DataError("control_cells is empty; give at least one control cell")
        return rows
    pert, ctx, _ = obs_labels(adata)
    rows = np.flatnonzero((ctx == str(context)) & (pert == control))
    if rows.size == 0:
        contexts = sorted({c for c, p in zip(ctx, pert) if p == control})
        raise DataError(
            f"no control cells ({control!r}) of context {context!r} in the data; contexts with "
            f"controls: {contexts}"
        )
    return rows


def sample_rows(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``rows``: a permutation when n == len(rows), without replacement when fewer, else with."""
    if n <= len(rows):
        return rows[rng.permutation(len(rows))[:n]]
    return np.concatenate([rows[rng.permutation(len(rows))], rows[rng.integers(0, len(rows), n - len(rows))]])


def make_prediction_adata(
    blocks: Sequence[np.ndarray],
    labels: Sequence[str],
    ctrl_X: np.ndarray,
    *,
    context: str,
    control: str,
    genes: Sequence[str],
    ctrl_names=None,
    paired: Sequence[np.ndarray] | None = None,
) -> ad.AnnData:
    """Predicted blocks (one per label) + real controls -> one AnnData (cell-eval format).

    ``paired``: per block, the obs names of the control cells each predicted cell was made from
    (``obs["paired_control"]``; empty for the real controls)."""
    X = np.concatenate([*blocks, ctrl_X], axis=0).astype(np.float32, copy=False)
    pert = [lab for lab, blk in zip(labels, blocks) for _ in range(len(blk))] + [control] * len(ctrl_X)
    n_pred = sum(len(b) for b in blocks)
    names = [f"pred_{i}" for i in range(n_pred)]
    names += list(ctrl_names) if ctrl_names is not None else [f"ctrl_{i}" for i in range(len(ctrl_X))]
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(pert),
            "context": pd.Categorical([str(context)] * len(X)),
            "predicted": np.r_[np.ones(n_pred, bool), np.zeros(len(ctrl_X), bool)],
        },
        index=pd.Index(names, dtype=str),
    )
    if paired is not None:
        obs["paired_control"] = [str(c) for blk in paired for c in blk] + [""] * len(ctrl_X)
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=str)))
    out.uns["statecore"] = {"control": control, "context": str(context)}
    return out


def max_log1p(adata) -> float:
    """After normalize_total(target_sum) + log1p no value can exceed log1p(target_sum)."""
    target_sum = float(adata.uns.get("statecore", {}).get("qc", {}).get("target_sum", 1e4))
    return float(np.log1p(target_sum))


def model_forward(model, x, z, batch, *, noise, context, max_log: float, x_genes) -> torch.Tensor:
    """One forward pass over sets of control cells -> predicted cells in gene space ``[B, S, G]``.

    ``x [B, S, D]`` model input (genes, or SE embeddings on the embedding track), ``z [B, P]``,
    ``batch`` long ``[B, S]``; ``x_genes()`` gives the controls in gene space ``[B, S, G]`` and is
    called only for the embedding track's residual decode."""
    out = model(x, z, batch, noise=noise, context=context)
    if getattr(model, "gene_decoder", None) is not None:
        out = model.decode(out)  # embedding track: back to the run's genes
        if model.cfg.decoder_residual:  # predicted change in gene space, applied to the real controls
            out = x_genes() + out - model.decode(x)
    # A model extrapolating past log1p(target_sum) (rare, early in training) would produce impossible cells.
    return out.clamp(0.0, max_log)


@dataclass
class _Plan:
    """What predicting in one context needs, set up once: the model's inputs and each cell's batch."""

    run: Any
    rows: np.ndarray  # the control rows predictions start from
    n: int  # predicted cells per perturbation
    gather: RowGatherer
    model_in: Any
    cell_batch: np.ndarray
    ctx_pos: int
    max_log: float
    device: torch.device
    rng: np.random.Generator
    gen: torch.Generator


def _plan(run, adata, context: str, n_cells, control_cells, seed: int) -> _Plan:
    gather = RowGatherer(adata.X, gene_indices(adata, run.genes))
    rows = control_rows(adata, context, run.vocab.control, control_cells)
    track = getattr(run, "track", None) or get_track(run.config.track)
    n = int(n_cells) if n_cells is not None else len(rows)
    if n < 1:
        raise DataError(f"n_cells must be at least 1; got {n_cells}")
    _, _, batch_labels = obs_labels(adata)
    bmap = {b: i for i, b in enumerate(run.batches or [])}
    cell_batch = np.full(adata.n_obs, -1, dtype=np.int64)  # batch index of each row we may perturb, once
    cell_batch[rows] = [bmap.get(b, -1) for b in batch_labels[rows]]
    contexts = [str(c) for c in run.contexts or []]
    return _Plan(
        run=run,
        rows=rows,
        n=n,
        gather=gather,
        model_in=track.input_gatherer(run, adata, rows, gather),  # embedding track: SE embeddings
        cell_batch=cell_batch,
        ctx_pos=contexts.index(str(context)) if str(context) in contexts else -1,  # -1: unseen context
        max_log=max_log1p(adata),
        device=next(run.model.parameters()).device,
        rng=np.random.default_rng(seed),
        gen=torch.Generator().manual_seed(int(seed)),
    )


def _perturbation_chunks(plan: _Plan, z: np.ndarray) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """(control rows the ``plan.n`` predicted cells start from, their predictions chunk by chunk).

    The rows are drawn at once (so draws do not depend on how the chunks are consumed); each chunk is
    ``[<= SETS_PER_FORWARD * S, G]`` float32, and the chunks together are exactly ``plan.n`` cells."""
    model, rows, n = plan.run.model, plan.rows, plan.n
    S = int(plan.run.config.model.set_size)
    picked = sample_rows(rows, n, plan.rng)
    n_sets = -(-n // S)
    padded = np.concatenate([picked, rows[plan.rng.integers(0, len(rows), n_sets * S - n)]]).reshape(
        n_sets, S
    )

    def chunks() -> Iterator[np.ndarray]:
        done, dev = 0, plan.device
        for i in range(0, n_sets, SETS_PER_FORWARD):
            chunk = padded[i : i + SETS_PER_FORWARD]
            noise = None
            if model.cfg.noise_dim > 0:
                noise = torch.randn(*chunk.shape, model.cfg.noise_dim, generator=plan.gen).to(dev)
            ctx_t = None
            if getattr(model, "needs_context", False):  # the shift prior's per-context table
                ctx_t = torch.full((len(chunk),), plan.ctx_pos, dtype=torch.long, device=dev)
            with torch.no_grad():
                out = model_forward(
                    model,
                    torch.from_numpy(plan.model_in(chunk)).to(dev),  # [b, S, G] (or [b, S, D] embeddings)
                    torch.from_numpy(np.broadcast_to(z, (len(chunk), len(z))).copy()).to(dev),  # [b, P]
                    torch.from_numpy(plan.cell_batch[chunk]).to(dev),  # [b, S]
                    noise=noise,
                    context=ctx_t,
                    max_log=plan.max_log,
                    x_genes=lambda c=chunk: torch.from_numpy(plan.gather(c)).to(dev),
                )
            cells = out.float().cpu().numpy().reshape(-1, len(plan.run.genes))[: n - done]
            done += len(cells)
            yield cells

    return picked, chunks()


def _start(run, adata, context, perturbations, n_cells, control_cells, seed) -> tuple[list[str], Any, _Plan]:
    """(labels, their encodings, the plan) for :func:`predict` and :func:`write_prediction`; the model in
    eval mode. Raises a DataError naming an unknown perturbation before any work."""
    labels = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    if not labels:
        raise DataError("give at least one perturbation to predict")
    z_all = run.vocab.encode(labels)
    plan = _plan(run, adata, context, n_cells, control_cells, seed)
    run.model.eval()
    return labels, z_all, plan


def predict(
    run,
    adata,
    *,
    context: str,
    perturbations: Sequence[str] | str,
    n_cells: int | None = None,
    control_cells=None,
    seed: int = 0,
) -> ad.AnnData:
    """Predicted cells for each perturbation in ``context`` (see module docstring)."""
    labels, z_all, plan = _start(run, adata, context, perturbations, n_cells, control_cells, seed)
    blocks, paired = [], []
    for z in z_all:
        picked, chunks = _perturbation_chunks(plan, z)
        paired.append(np.asarray(adata.obs_names[picked]).astype(str))  # predicted cell i came from picked[i]
        blocks.append(np.concatenate(list(chunks)))
    out = make_prediction_adata(
        blocks,
        labels,
        plan.gather(plan.rows),
        context=context,
        control=run.vocab.control,
        genes=run.genes,
        ctrl_names=adata.obs_names[plan.rows].astype(str),
        paired=paired,
    )
    return mark_unseen(out, run)


def trained_genes(run) -> set[str]:
    """Single perturbations the run trained on (any context): what is not among them is an unseen gene."""
    split, vocab = getattr(run, "split", None), run.vocab
    if split is None:
        return set(vocab.names) - {vocab.control}
    return {q for _, p in split.pairs("train") for q in vocab.parts(p)} - {vocab.control}


def unseen_labels(run, labels: Sequence[str]) -> list[str]:
    """Labels with a gene no training context perturbed (only a gene-feature run can predict those)."""
    seen, vocab = trained_genes(run), run.vocab
    return [lab for lab in labels if lab != vocab.control and not set(vocab.parts(lab)) <= seen]


def validation_score(run_dir) -> float | None:
    """The run's validation pearson_delta at its best checkpoint (lowest validation loss). On an unseen-genes
    run the validation genes were held out of training in every context, so this is its score on unseen
    genes; None when the run logged no validation."""
    from statecore.runs.files import read_metrics

    recs = [r for r in read_metrics(run_dir) if "val_loss" in r and "val_pearson_delta" in r]
    if not recs:
        return None
    best = min(recs, key=lambda r: (float(r["val_loss"]), -int(r.get("step", 0))))
    return float(best["val_pearson_delta"])


def mark_unseen(pred: ad.AnnData, run) -> ad.AnnData:
    """Gene-feature runs: ``obs["unseen_gene"]`` (predicted cells of a perturbation no training context
    measured) and ``uns["statecore"]["unseen"]`` with the run's validation score on unseen genes."""
    if run.vocab is None or run.vocab.features is None:
        return pred
    labels = pred.obs["perturbation"].astype(str).to_numpy()
    unseen = set(unseen_labels(run, sorted(set(labels))))
    pred.obs["unseen_gene"] = np.isin(labels, list(unseen)) & pred.obs["predicted"].to_numpy()
    score = validation_score(run.run_dir)
    pred.uns["statecore"]["unseen"] = {
        "perturbations": sorted(unseen),
        "validation_pearson_delta": float("nan") if score is None else score,
        "note": unseen_note(len(unseen), score),
    }
    return pred


def unseen_note(n_unseen: int, score: float | None) -> str:
    """One sentence shown beside predictions of unseen genes (CLI, Predict and Screen pages)."""
    if not n_unseen:
        return "every predicted perturbation was measured in training"
    how = (
        f"on validation genes held out the same way, this run's pearson delta was {score:.2f}"
        if score is not None
        else "this run logged no validation score"
    )
    return (
        f"{n_unseen} perturbation(s) target genes no training context perturbed: predicted from gene features "
        f"only; {how} (compare the generic response and linear baselines on Evaluate before trusting them)"
    )


def write_prediction(
    path,
    run,
    adata,
    *,
    context: str,
    perturbations: Sequence[str] | str,
    n_cells: int | None = None,
    control_cells=None,
    seed: int = 0,
    ctrl_chunk: int = 4096,
) -> int:
    """:func:`predict` written straight to an .h5ad file, chunk by chunk: the same file ``predict`` +
    ``write_h5ad`` would give (same cells, same values), with memory bounded by one forward chunk, not
    by the output (100,000 cells x 2,000 genes are 800 MB). Written to a temporary file and renamed, so
    a reader never sees a half-written file. Returns the number of predicted cells."""
    labels, z_all, plan = _start(run, adata, context, perturbations, n_cells, control_cells, seed)
    n_pred, G = plan.n * len(labels), len(run.genes)
    paired = []
    with atomic_h5(path, need_bytes=(n_pred + len(plan.rows)) * G * 4) as f:
        X = f.create_dataset(
            "X", shape=(n_pred + len(plan.rows), G), dtype="f4", chunks=(min(1024, n_pred), G)
        )
        X.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        at = 0
        for z in z_all:
            picked, chunks = _perturbation_chunks(plan, z)
            paired.append(np.asarray(adata.obs_names[picked]).astype(str))
            for cells in chunks:
                X[at : at + len(cells)] = cells
                at += len(cells)
        for i in range(0, len(plan.rows), ctrl_chunk):
            part = plan.rows[i : i + ctrl_chunk]
            X[at : at + len(part)] = plan.gather(part)
            at += len(part)
        shell = make_prediction_adata(
            [np.empty((plan.n, 0), np.float32)] * len(labels),
            labels,
            np.empty((len(plan.rows), 0), np.float32),
            context=context,
            control=run.vocab.control,
            genes=[],
            ctrl_names=adata.obs_names[plan.rows].astype(str),
            paired=paired,
        )
        shell = mark_unseen(shell, run)  # gene-feature runs: obs["unseen_gene"] and the validation score
        write_elem(f, "obs", shell.obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index(list(run.genes), dtype=str)))
        write_elem(f, "uns", dict(shell.uns))
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
    return n_pred


@contextmanager
def atomic_h5(path, need_bytes: int = 0) -> Iterator[Any]:
    """An h5py file, written as an AnnData root, that appears at ``path`` only when complete
    (``runs.files.atomic_output``: disk space checked first, one-line errors, no temporary file left)."""
    import h5py

    out = Path(path)
    if out.suffix != ".h5ad":
        raise DataError(f"output {str(path)!r} must end in .h5ad")
    with atomic_output(out, need_bytes) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        yield f


@torch.no_grad()
def predict_shared(
    run, adata, *, context: str, labels: Sequence[str], n_cells: int = 128, seed: int = 0, chunk: int = 32
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Predict many perturbations on ONE shared sample of ``context``'s controls, ``chunk`` at a time.

    Yields ``(labels_of_chunk, cells [k, n_cells, G])`` (float32, the run's genes, log1p). Every
    perturbation perturbs the same control cells with the same noise draws (common random numbers),
    so differences between perturbations are the model's, not the sampling's; and the k perturbations
    of a chunk go through the model in one forward pass, stacked along the batch dimension. Only one
    chunk of predicted cells exists at a time (the caller reduces it before asking for the next).
    """
    if n_cells < 2:
        raise DataError(f"n_cells must be at least 2; got {n_cells}")
    if chunk < 1:
        raise DataError(f"chunk must be at least 1; got {chunk}")
    vocab, model = run.vocab, run.model
    gather = RowGatherer(adata.X, gene_indices(adata, run.genes))
    rows = control_rows(adata, context, vocab.control)
    rng = np.random.default_rng(seed)
    S = int(run.config.model.set_size)
    n_sets = -(-n_cells // S)
    picked = sample_rows(rows, n_cells, rng)
    padded = np.concatenate([picked, rows[rng.integers(0, len(rows), n_sets * S - n_cells)]])
    padded = padded.reshape(n_sets, S)
    track = getattr(run, "track", None) or get_track(run.config.track)
    model_in = track.input_gatherer(run, adata, padded.ravel(), gather)
    device = next(model.parameters()).device
    model.eval()
    x = torch.from_numpy(model_in(padded)).to(device)  # [n_sets, S, D]
    _, _, batch_labels = obs_labels(adata)
    bmap = {b: i for i, b in enumerate(run.batches or [])}
    cell_batch = np.array([bmap.get(b, -1) for b in batch_labels[padded.ravel()]], dtype=np.int64)
    bidx = torch.from_numpy(cell_batch.reshape(n_sets, S)).to(device)  # [n_sets, S]
    noise = None
    if model.cfg.noise_dim > 0:
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(n_sets, S, model.cfg.noise_dim, generator=gen).to(device)  # [n_sets, S, N]
    contexts = [str(c) for c in run.contexts or []]
    ctx_pos = contexts.index(str(context)) if str(context) in contexts else -1
    x_genes = None  # [n_sets, S, G]: gene-space controls, for the embedding track's residual decode only
    if getattr(model, "gene_decoder", None) is not None and model.cfg.decoder_residual:
        x_genes = torch.from_numpy(gather(padded)).to(device)
    max_log = max_log1p(adata)
    labels = list(labels)
    for start in range(0, len(labels), chunk):
        part = labels[start : start + chunk]
        k = len(part)
        z = torch.from_numpy(vocab.encode(part)).to(device).repeat_interleave(n_sets, dim=0)  # [k*n_sets, P]
        ctx_t = None
        if getattr(model, "needs_context", False):
            ctx_t = torch.full((k * n_sets,), ctx_pos, dtype=torch.long, device=device)
        out = model_forward(
            model,
            x.repeat(k, 1, 1),  # [k*n_sets, S, D]: perturbation-major, each sees the same sets
            z,
            bidx.repeat(k, 1),
            noise=None if noise is None else noise.repeat(k, 1, 1),
            context=ctx_t,
            max_log=max_log,
            x_genes=lambda k=k, xg=x_genes: xg.repeat(k, 1, 1),
        )  # [k*n_sets, S, G]
        cells = out.float().reshape(k, n_sets * S, -1)[:, :n_cells]  # [k, n_cells, G]
        yield part, cells.cpu().numpy()


def real_for_split(adata, split, genes: Sequence[str]) -> ad.AnnData:
    """The real test cells of ``split`` plus the target context's controls (for scoring only)."""
    pert, ctx, _ = obs_labels(adata)
    test = set(split.test.get(split.context, []))
    mask = (ctx == split.context) & (np.isin(pert, list(test)) | (pert == split.control))
    sub = adata[mask, gene_indices(adata, genes)]
    X = sub.X.toarray() if sp.issparse(sub.X) else np.asarray(sub.X)
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(pert[mask]), "context": pd.Categorical(ctx[mask])},
        index=sub.obs_names.astype(str),
    )
    out = ad.AnnData(
        X=X.astype(np.float32, copy=False), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=str))
    )
    out.uns["statecore"] = {"control": split.control, "context": split.context}
    return out


def predict_split(run, adata, *, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """(predicted, real) for every test perturbation of the run's split."""
    split = run.split
    if split is None:
        raise DataError(f"run {str(run.run_dir)!r} has no split.json; predict with --context/--perturbation")
    perts = list(split.test.get(split.context, []))
    pred = predict(run, adata, context=split.context, perturbations=perts, seed=seed)
    return pred, real_for_split(adata, split, run.genes)
