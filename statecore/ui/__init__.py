"""Streamlit-only helpers for the app: session state, cached loaders, Plotly figures, widgets.

Everything that does not need streamlit (analysis, training options) is importable without it;
``statecore`` itself never imports this package.
"""
