"""Shared helpers for the Streamlit AppTest page tests: open a page with a session, and the session's
``sc_prepared`` entry for a prepared AnnData."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def open_page(page: str, *, timeout: float = 180, **session) -> AppTest:
    """Run ``app.py`` with ``session`` in its session state, switch to ``pages/<page>`` and run it."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    for key, value in session.items():
        at.session_state[key] = value
    at.run()
    at.switch_page(f"pages/{page}")
    return at.run()


def prepared_info(adata, path: Path) -> dict:
    """The session's ``sc_prepared`` entry for ``adata`` written to ``path``."""
    adata.write_h5ad(path)
    return {"path": str(path), "qc": {}, "n_obs": adata.n_obs, "n_vars": adata.n_vars}
