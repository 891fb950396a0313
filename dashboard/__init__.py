"""Streamlit dashboard: pages in dashboard/views/, logic in plain helper modules here."""
