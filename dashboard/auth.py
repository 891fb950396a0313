"""Password gate. Loopback with no password: open. Any other bind address: a password is required.

The password comes from the environment variable DASHBOARD_PASSWORD or from
.streamlit/secrets.toml (`password = "..."`) and is compared with hmac.compare_digest.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Optional

ENV_VAR = "DASHBOARD_PASSWORD"
SESSION_KEY = "_authenticated"


def configured_password(secrets=None) -> Optional[str]:
    """The password from the environment, else from Streamlit secrets; None when neither is set."""
    value = os.environ.get(ENV_VAR)
    if value:
        return value
    if secrets is None:
        return None
    try:
        value = secrets.get("password")
    except Exception:  # no secrets.toml: Streamlit raises on access
        return None
    return str(value) if value else None


def is_loopback(address: Optional[str]) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for '', None (Streamlit binds all then), 0.0.0.0."""
    if not address:
        return False
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def password_ok(given: Optional[str], expected: str) -> bool:
    return hmac.compare_digest((given or "").encode("utf-8"), expected.encode("utf-8"))


def gate_decision(address: Optional[str], password: Optional[str]) -> str:
    """'open' (loopback, no password), 'ask' (a password is set), or 'refuse' (exposed, no password)."""
    if password:
        return "ask"
    return "open" if is_loopback(address) else "refuse"


def require_login() -> None:
    """Show the login form or a refusal and stop the script unless the session may see pages."""
    import streamlit as st

    decision = gate_decision(st.get_option("server.address"), configured_password(st.secrets))
    if decision == "open" or st.session_state.get(SESSION_KEY):
        return
    if decision == "refuse":
        st.error("This dashboard is bound to a non-loopback address without a password. "
                 f"Set {ENV_VAR} (or `password` in .streamlit/secrets.toml) and restart, "
                 "or bind to 127.0.0.1 and use an SSH tunnel.")
        st.stop()
    st.title("Plate detector dashboard")
    with st.form("login"):
        given = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        if password_ok(given, configured_password(st.secrets) or ""):
            st.session_state[SESSION_KEY] = True
            st.rerun()
        st.error("Wrong password.")
    st.stop()
