"""State Transition (ST) model: maps a set of control cells plus a perturbation to a perturbed set.

    h_i  = basal(x_ctrl_i) + pert(z) [+ batch_emb(b_i)] [+ noise_proj(eps_i)]    # [B, S, H]
    t    = Transformer(h)  (bidirectional over the S cells, no positional encoding)
    out  = ReLU(project_out(t + basal(x_ctrl)))    # residual to the control in hidden space

The module knows nothing of AnnData; ``statecore.data.sets`` turns data into tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from statecore.config import STConfig
from statecore.models.decoder import GeneDecoder
from statecore.models.layers import mlp, set_transformer

RESIDUALS = ("hidden", "expression", "none")
PRIOR_SINGLES = ("average", "leave_context_out")


class StateTransitionModel(nn.Module):
    """ST model built from an :class:`STConfig` (or its fields as keywords).

    ``StateTransitionModel(cfg)``, ``StateTransitionModel(num_genes=2000, hidden_dim=256, ...)`` or both
    (keywords override the config's fields).
    """

    def __init__(self, cfg: STConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = STConfig(**overrides) if cfg is None else (cfg.replace(**overrides) if overrides else cfg)
        if cfg.residual not in RESIDUALS:
            raise ValueError(f"STConfig.residual must be one of {RESIDUALS}; got {cfg.residual!r}")
        if cfg.prior_singles not in PRIOR_SINGLES:
            raise ValueError(
                f"STConfig.prior_singles must be one of {PRIOR_SINGLES}; got {cfg.prior_singles!r}"
            )
        if cfg.basal_encoder not in ("mlp", "linear"):
            raise ValueError(f"STConfig.basal_encoder must be 'mlp' or 'linear'; got {cfg.basal_encoder!r}")
        self.cfg = cfg
        G, H, M = cfg.num_genes, cfg.hidden_dim, cfg.mlp_hidden_dim
        self.basal_encoder = (
            mlp(G, M, H, dropout=cfg.dropout) if cfg.basal_encoder == "mlp" else nn.Linear(G, H)
        )
        # gene-feature encoding: the last self_dims columns of z mark the perturbed gene in the panel; they
        # steer the prior only, the encoder sees the features (so a never-measured gene is encoded alike)
        self.pert_encoder = mlp(cfg.perturbation_dim - cfg.self_dims, M, H, dropout=cfg.dropout)
        self.batch_embedding = nn.Embedding(cfg.n_batches, H) if cfg.n_batches > 0 else None
        self.noise_proj = nn.Linear(cfg.noise_dim, H) if cfg.noise_dim > 0 else None
        self.transformer = set_transformer(H, cfg.transformer_heads, cfg.transformer_layers, M, cfg.dropout)
        self.project_out = mlp(H, M, G, n_layers=cfg.out_layers, dropout=cfg.dropout)
        # Embedding track (decoder_dim > 0): ST predicts SE embeddings (width G = D) and this decoder,
        # saved in the same checkpoint, maps them back to decoder_dim genes (see statecore.embedding.track).
        self.gene_decoder = (
            GeneDecoder(G, cfg.decoder_dim, hidden_dim=M, dropout=cfg.dropout)
            if cfg.decoder_dim > 0
            else None
        )
        self.register_buffer("feature_map", None)  # a None buffer is not in the state dict
        if cfg.shift_prior and cfg.decoder_dim == 0 and cfg.pert_encoding == "features":
            # [C+1, F+1, G] ridge maps features -> mean shift per training context, pooled last (priors.feature_ridge)
            self.register_buffer(
                "feature_map", torch.zeros(cfg.n_contexts + 1, cfg.perturbation_dim - cfg.self_dims, G)
            )
            self.pert_shift = None
        elif cfg.shift_prior and cfg.decoder_dim == 0:
            # [P, G] mean expression shift of each single perturbation (statecore.training.priors), set before
            # training from training cells only and saved with the weights; z @ shift sums a combination's singles.
            self.register_buffer("pert_shift", torch.zeros(cfg.perturbation_dim, G))
        else:
            self.pert_shift = None
        if self.pert_shift is not None and cfg.n_prior_pairs > 0 and cfg.n_contexts > 0:
            # a context's own shift of a single, where training measured that pair (statecore.training.priors)
            self.register_buffer(
                "pair_index", torch.full((cfg.n_contexts, cfg.perturbation_dim), -1, dtype=torch.long)
            )
            self.register_buffer("pair_shift", torch.zeros(cfg.n_prior_pairs, G))
        else:
            self.pair_index = self.pair_shift = None
        if self.pert_shift is not None and cfg.prior_shrink == "context" and cfg.n_contexts > 0:
            # shrinkage of a single's shift toward its context's mean perturbed shift (training.priors)
            self.register_buffer("pert_trust", torch.ones(cfg.perturbation_dim))
            self.register_buffer("context_generic", torch.zeros(cfg.n_contexts + 1, G))
        else:
            self.pert_trust = self.context_generic = None
        # learned per-context, per-gene gain on the prior's shift: shift * (1 + gain[context]), zero-initialised
        # (weight decay pulls it back to a gain of 1); a context never trained on keeps gain 1
        self.context_gain = (
            nn.Parameter(torch.zeros(cfg.n_contexts, G))
            if self.pert_shift is not None and cfg.context_gain and cfg.n_contexts > 0
            else None
        )
        # the forward pass needs each set's context index for any per-context part
        self.needs_context = any(
            m is not None
            for m in (self.pair_shift, self.feature_map, self.context_generic, self.context_gain)
        )
        if cfg.residual == "expression":
            # Start as the identity map on expression: the model then only has to learn the shift.
            nn.init.zeros_(self.project_out[-1].weight)
            nn.init.zeros_(self.project_out[-1].bias)

    def forward(
        self,
        x_ctrl: torch.Tensor,
        z_pert: torch.Tensor,
        batch: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_ctrl [B, S, G]``, ``z_pert [B, S, P]`` or ``[B, P]``, ``batch`` long ``[B, S]`` or ``[B]``
        (index -1: unknown batch, no embedding added), ``context`` long ``[B]`` (index into the training
        contexts, -1 unknown; used by the shift prior only) -> predicted perturbed cells ``[B, S, G]``."""
        if x_ctrl.dim() != 3:
            raise ValueError(f"x_ctrl must be [B, S, G]; got shape {tuple(x_ctrl.shape)}")
        B, S, G = x_ctrl.shape
        if G != self.cfg.num_genes:
            raise ValueError(f"x_ctrl has {G} genes, the model was built for {self.cfg.num_genes}")
        # One perturbation per set (z_pert [B, P], how training and prediction call it): encode it and
        # take its prior shift once per set, not once per cell (with a 1,000-perturbation vocabulary the
        # per-cell [P, G] product alone cost more than the transformer).
        z_set = z_pert if z_pert.dim() == 2 else None  # [B, P] or None
        if z_set is not None:
            z_pert = z_pert.unsqueeze(1).expand(B, S, z_pert.shape[-1])  # [B, S, P]
        if z_pert.shape[:2] != (B, S) or z_pert.shape[-1] != self.cfg.perturbation_dim:
            raise ValueError(
                f"z_pert must be [B, S, {self.cfg.perturbation_dim}] or [B, "
                f"{self.cfg.perturbation_dim}]; got {tuple(z_pert.shape)}"
            )
        basal = self.basal_encoder(x_ctrl)  # [B, S, H]
        if z_set is not None:
            h = basal + self.pert_encoder(self._enc(z_set).to(x_ctrl.dtype)).unsqueeze(1)  # [B, S, H]
        else:
            h = basal + self.pert_encoder(self._enc(z_pert).to(x_ctrl.dtype))  # [B, S, H]
        if self.batch_embedding is not None and batch is not None:
            if batch.dim() == 1:
                batch = batch.unsqueeze(1).expand(B, S)
            known = (batch >= 0).unsqueeze(-1).to(h.dtype)  # [B, S, 1]
            h = h + self.batch_embedding(batch.clamp_min(0)) * known
        if self.noise_proj is not None:
            if noise is None:
                noise = torch.randn(B, S, self.cfg.noise_dim, device=h.device, dtype=h.dtype)
            h = h + self.noise_proj(noise)
        t = self.transformer(h)  # [B, S, H]
        if self.cfg.residual == "hidden":
            t = t + basal
        out = self.project_out(t)  # [B, S, G]
        if self.cfg.residual == "expression":
            out = out + x_ctrl
        if self.feature_map is not None:
            z0 = (z_set if z_set is not None else z_pert[:, 0]).to(out.dtype)  # [B, P]: one per set
            shift = self._feature_prior(x_ctrl, z0, context)[:, None]  # [B, 1, G]
            out = out + self.prior_cells(x_ctrl, shift, self.cfg.prior_mode) - x_ctrl
        elif self.pert_shift is not None:
            if z_set is not None:
                shift = (z_set.to(out.dtype) @ self.pert_shift).unsqueeze(1)  # [B, 1, G]
            else:
                shift = z_pert.to(out.dtype) @ self.pert_shift  # [B, S, P] @ [P, G]
            if context is not None and self.pair_shift is not None:
                shift = shift + self._context_correction(z_pert[:, 0].to(out.dtype), context)[:, None]
            if z_set is not None and self.pert_trust is not None:
                shift = self._shrink(z_set.to(out.dtype), context, shift)
            if context is not None and self.context_gain is not None:
                shift = shift * self._gain(context, B)
            out = out + self.prior_cells(x_ctrl, shift, self.cfg.prior_mode) - x_ctrl
        if self.cfg.relu_output:
            out = torch.relu(out)
        return out

    def _enc(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., : z.shape[-1] - self.cfg.self_dims] if self.cfg.self_dims else z

    def _feature_prior(
        self, x_ctrl: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, G]``: the ridge map of the set's context (pooled for an unknown one) applied to its features
        ``z [B, P]``; with a perturbation type, the perturbed gene's own expression set by ``self_effect``
        (relative to the set's control mean for knockdown / knockout, added for activation)."""
        B = z.shape[0]
        C = self.feature_map.shape[0] - 1
        if context is None:
            idx = torch.full((B,), C, dtype=torch.long, device=z.device)
        else:
            idx = context.to(device=z.device, dtype=torch.long).reshape(B)
            idx = torch.where((idx >= 0) & (idx < C), idx, torch.full_like(idx, C))
        shift = torch.einsum("bf,bfg->bg", self._enc(z), self.feature_map[idx])  # [B, G]
        if self.cfg.self_dims and self.cfg.perturbation_type != "none":
            own_gene = z[:, z.shape[1] - self.cfg.self_dims :] > 0  # [B, G]
            if self.cfg.perturbation_type == "activation":
                own = torch.full_like(shift, self.cfg.self_effect)
            else:
                own = self.cfg.self_effect * x_ctrl.mean(dim=1)  # [B, G]
            shift = torch.where(own_gene, own, shift)
        return shift

    def _context_correction(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``[B, G]``: for each single of each set's combination ``z [B, P]`` that its context measured in
        training, that context's own shift minus the all-context average (already in the prior), so a
        combination's prior is the sum of its singles as measured in that context (the additive baseline)."""
        B, G = z.shape[0], self.pert_shift.shape[1]
        context = context.to(device=z.device, dtype=torch.long).reshape(B)
        rows = self.pair_index[context.clamp_min(0)]  # [B, P]
        rows = torch.where(context[:, None] >= 0, rows, torch.full_like(rows, -1))
        # Combinations only: a single keeps the all-context average, so the model still learns each
        # context's deviation from it (and can apply it to pairs no context-specific shift exists for).
        combo = ((z != 0).sum(dim=1) >= 2)[:, None]  # [B, 1]
        b, j = ((rows >= 0) & (z != 0) & combo).nonzero(as_tuple=True)
        corr = torch.zeros(B, G, dtype=z.dtype, device=z.device)
        if b.numel():
            corr.index_add_(0, b, z[b, j, None] * (self.pair_shift[rows[b, j]] - self.pert_shift[j]))
        if self.cfg.prior_singles == "leave_context_out":
            # a single measured in its own context and n >= 2 contexts: the mean of the n - 1 others,
            # (n * avg - own) / (n - 1) = avg + (avg - own) / (n - 1); a held-out pair has no own shift
            n = (self.pair_index >= 0).sum(dim=0).to(z.dtype)  # [P] contexts measuring each single
            b, j = ((rows >= 0) & (z != 0) & ~combo & (n[None] >= 2)).nonzero(as_tuple=True)
            if b.numel():
                loo = (self.pert_shift[j] - self.pair_shift[rows[b, j]]) / (n[j, None] - 1)
                corr.index_add_(0, b, z[b, j, None] * loo)
        return corr

    def _shrink(self, z: torch.Tensor, context: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
        """``[B, 1, G]``: a single's shift as ``trust * shift + (1 - trust) * generic[context]``, the last
        generic row for an unknown context (or none given); combinations keep theirs."""
        B = z.shape[0]
        unknown = self.context_generic.shape[0] - 1
        if context is None:
            idx = torch.full((B,), unknown, dtype=torch.long, device=z.device)
        else:
            context = context.to(device=z.device, dtype=torch.long).reshape(B)
            idx = torch.where(context >= 0, context, torch.full_like(context, unknown))
        trust = (z.abs() @ self.pert_trust).clamp(0, 1)[:, None]  # [B, 1]
        shrunk = trust * shift[:, 0] + (1 - trust) * self.context_generic[idx]
        single = ((z != 0).sum(dim=1) == 1)[:, None]
        return torch.where(single, shrunk, shift[:, 0])[:, None]

    def _gain(self, context: torch.Tensor, B: int) -> torch.Tensor:
        """``[B, 1, G]``: 1 + the learned gain of each set's context (1 for an unknown context, -1)."""
        context = context.to(device=self.context_gain.device, dtype=torch.long).reshape(B)
        gain = self.context_gain[context.clamp_min(0)] * (context >= 0)[:, None].to(self.context_gain.dtype)
        return (1.0 + gain)[:, None]

    @staticmethod
    def prior_cells(x_ctrl: torch.Tensor, shift: torch.Tensor, mode: str = "scale_down") -> torch.Tensor:
        """Control cells ``[B, S, G]`` moved so that the set's mean expression changes by ``shift`` ``[B, S, G]``.

        ``scale_down``: up-shifts are added to every cell, down-shifts scale the cells by (m + shift) / m, m the
        set's mean: subtracting them instead would push the many zero entries below zero, where the ReLU clips
        them and the set's mean would fall by less than the shift (on the synthetic validation screen this cost
        0.03 of discrimination score). ``scale``: up-shifts scale too where the gene is expressed in the set
        (m >= 0.1), so that zeros stay zeros, as in real cells, and are added only to genes the set barely
        expresses. ``add``: every shift added to every cell."""
        if mode == "add":
            return x_ctrl + shift
        m = x_ctrl.mean(dim=1, keepdim=True)  # [B, 1, G]
        ratio = (m + shift).clamp_min(0) / m.clamp_min(1e-6)  # [B, S, G]
        scale = shift < 0
        if mode == "scale":
            scale = scale | (m >= 0.1)
        return torch.where(scale, x_ctrl * ratio, x_ctrl + shift)

    def decode(self, pred: torch.Tensor) -> torch.Tensor:
        """Embedding track: predicted embeddings ``[..., D]`` -> log1p expression ``[..., decoder_dim]``."""
        if self.gene_decoder is None:
            raise ValueError("this ST model has no gene decoder (STConfig.decoder_dim is 0: HVG track)")
        return self.gene_decoder(pred)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
