"""Server-rendered HTML for the emulator's Intuit pages (sign-in, company, consent, errors).

Plain strings with every dynamic value escaped: no template engine, no JavaScript, no external
assets, so the pages work offline and a browser test can click them by element id.
"""

from __future__ import annotations

from html import escape

from .config import ADMIN_ROLES, ROLE_LABELS, SCOPE_LABELS
from .state import Company, User

INTUIT_GREEN = "#2CA01C"

_CSS = f"""
* {{ box-sizing: border-box; }}
body {{ margin: 0; font-family: "Avenir Next", "Segoe UI", Helvetica, Arial, sans-serif;
  background: #f4f5f8; color: #393a3d; }}
header {{ background: #fff; border-bottom: 1px solid #dcdcdc; padding: 14px 24px;
  display: flex; align-items: center; gap: 10px; }}
.logo {{ width: 30px; height: 30px; border-radius: 50%; background: {INTUIT_GREEN}; color: #fff;
  font-weight: 700; display: inline-flex; align-items: center; justify-content: center;
  font-size: 14px; }}
.brand {{ font-weight: 700; font-size: 20px; letter-spacing: -0.5px; }}
.brand small {{ font-weight: 400; color: #6b6c72; font-size: 13px; margin-left: 6px; }}
main {{ max-width: 480px; margin: 40px auto; background: #fff; border-radius: 8px;
  box-shadow: 0 2px 8px rgba(0,0,0,.08); padding: 32px; }}
h1 {{ font-size: 22px; margin: 0 0 16px; }}
p {{ line-height: 1.5; }}
.whoami {{ display: flex; justify-content: space-between; align-items: center; font-size: 13px;
  color: #6b6c72; border-bottom: 1px solid #eceef1; padding-bottom: 12px; margin-bottom: 20px; }}
.whoami form {{ margin: 0; }}
button, .button {{ font: inherit; font-weight: 600; border-radius: 4px; padding: 10px 18px;
  cursor: pointer; border: 2px solid {INTUIT_GREEN}; background: {INTUIT_GREEN}; color: #fff; }}
button.secondary {{ background: #fff; color: {INTUIT_GREEN}; }}
button.link {{ border: none; background: none; color: #0077c5; padding: 0; font-weight: 400; }}
button.choice {{ width: 100%; text-align: left; background: #fff; color: #393a3d;
  font-weight: 400; border: 1px solid #babec5; margin-bottom: 10px; display: flex;
  justify-content: space-between; align-items: center; }}
button.choice:hover {{ border-color: {INTUIT_GREEN}; }}
.actions {{ display: flex; gap: 12px; justify-content: flex-end; margin-top: 24px; }}
.actions form {{ margin: 0; }}
.badge {{ font-size: 11px; font-weight: 600; border-radius: 10px; padding: 2px 8px;
  text-transform: uppercase; }}
.badge.admin {{ background: #e3f4e0; color: #1d7b12; }}
.badge.non-admin {{ background: #fdeceb; color: #c0392b; }}
.muted {{ color: #6b6c72; font-size: 13px; }}
.error {{ background: #fdeceb; border-left: 4px solid #d52b1e; padding: 10px 12px;
  margin-bottom: 16px; }}
.warning {{ background: #fff8e1; border-left: 4px solid #f2b400; padding: 10px 12px;
  margin-bottom: 16px; }}
input[type=email] {{ width: 100%; padding: 10px; font: inherit; border: 1px solid #babec5;
  border-radius: 4px; margin: 6px 0 12px; }}
ul.scopes {{ padding-left: 20px; }}
ul.scopes li {{ margin-bottom: 6px; }}
hr {{ border: none; border-top: 1px solid #eceef1; margin: 24px 0; }}
footer {{ text-align: center; color: #8d9096; font-size: 12px; margin-bottom: 40px; }}
"""


def _flow_url(flow_id: str, action: str = "") -> str:
    base = f"/connect/oauth2/flow/{escape(flow_id)}"
    return f"{base}/{action}" if action else base


def _layout(title: str, body: str, *, flow_id: str | None = None, user: User | None = None) -> str:
    whoami = ""
    if user is not None and flow_id is not None:
        whoami = (
            '<div class="whoami"><span id="signed-in-user">Signed in as '
            f"<strong>{escape(user.name)}</strong> ({escape(user.email)})</span>"
            f'<form method="post" action="{_flow_url(flow_id, "signout")}">'
            '<button type="submit" id="not-you" class="link">Not you?</button></form></div>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} | Intuit</title><style>{_CSS}</style></head><body>"
        '<header><span class="logo">qb</span><span class="brand">intuit'
        "<small>QuickBooks (local emulator)</small></span></header>"
        f"<main>{whoami}{body}</main>"
        "<footer>Local Intuit emulator for development. Not affiliated with Intuit.</footer>"
        "</body></html>"
    )


def _consent_form(
    flow_id: str,
    button_id: str,
    label: str,
    decision: str,
    *,
    secondary: bool = False,
    connect_anyway: bool = False,
) -> str:
    extra = '<input type="hidden" name="connect_anyway" value="true">' if connect_anyway else ""
    css = ' class="secondary"' if secondary else ""
    return (
        f'<form method="post" action="{_flow_url(flow_id, "consent")}">'
        f'<input type="hidden" name="decision" value="{decision}">{extra}'
        f'<button type="submit" id="{button_id}"{css}>{escape(label)}</button></form>'
    )


def error_page(title: str, message: str, code: str) -> str:
    body = (
        f'<h1 id="error-title">{escape(title)}</h1>'
        f'<p id="error-message">{escape(message)}</p>'
        f'<p class="muted">Error code: <code id="error-code">{escape(code)}</code></p>'
    )
    return _layout(title, body)


def signin_page(
    flow_id: str, users: list[User], company_names: dict[str, str], error: str | None = None
) -> str:
    buttons = []
    for user in users:
        admin = any(role in ADMIN_ROLES for role in user.companies.values())
        badge = (
            '<span class="badge admin">admin</span>'
            if admin
            else '<span class="badge non-admin">non-admin</span>'
        )
        roles = (
            ", ".join(
                f"{ROLE_LABELS.get(role, role)} of {company_names.get(realm, realm)}"
                for realm, role in user.companies.items()
            )
            or "No QuickBooks companies"
        )
        buttons.append(
            f'<form method="post" action="{_flow_url(flow_id, "signin")}">'
            f'<input type="hidden" name="email" value="{escape(user.email)}">'
            f'<button type="submit" class="choice" id="signin-{escape(user.sub)}">'
            f"<span><strong>{escape(user.name)}</strong><br>"
            f'<span class="muted">{escape(user.email)}</span><br>'
            f'<span class="muted">{escape(roles)}</span></span>{badge}</button></form>'
        )
    error_html = f'<div class="error" id="signin-error">{escape(error)}</div>' if error else ""
    body = (
        "<h1>Sign in</h1>"
        f"{error_html}"
        '<p class="muted">One account. Everything Intuit. Choose a QuickBooks user:</p>'
        + "".join(buttons)
        + "<hr>"
        f'<form method="post" action="{_flow_url(flow_id, "signin")}">'
        '<label for="email">Email or user ID</label>'
        '<input type="email" id="email" name="email" required autocomplete="username">'
        '<button type="submit" id="signin-submit">Sign in</button></form>'
    )
    return _layout("Sign in", body)


def company_page(flow_id: str, user: User, companies: list[Company], error: str | None = None) -> str:
    error_html = f'<div class="error" id="company-error">{escape(error)}</div>' if error else ""
    buttons = "".join(
        f'<button type="submit" class="choice" name="realm_id" value="{escape(c.realm_id)}" '
        f'id="company-{escape(c.realm_id)}"><span><strong>{escape(c.name)}</strong><br>'
        f'<span class="muted">{escape(ROLE_LABELS.get(user.companies[c.realm_id], ""))}'
        "</span></span></button>"
        for c in companies
    )
    body = (
        "<h1>Select a company</h1>"
        f"{error_html}"
        "<p>Which QuickBooks company do you want to connect?</p>"
        f'<form method="post" action="{_flow_url(flow_id, "company")}">{buttons}</form>'
    )
    return _layout("Select a company", body, flow_id=flow_id, user=user)


def no_company_page(flow_id: str, user: User) -> str:
    body = (
        "<h1>No QuickBooks company</h1>"
        '<p id="no-company">Your Intuit account does not have access to any QuickBooks Online '
        "company.</p>"
        '<div class="actions">' + _consent_form(flow_id, "back-to-app", "Back to app", "deny") + "</div>"
    )
    return _layout("No company", body, flow_id=flow_id, user=user)


def not_admin_page(flow_id: str, user: User, company: Company, admins: list[User]) -> str:
    who = ", ".join(f"{a.name} ({a.email})" for a in admins) or "your master admin"
    body = (
        f"<h1>Sorry, you can't connect apps to {escape(company.name)}</h1>"
        '<div class="error" id="not-admin">You need to be a Master admin or Company admin to '
        "connect apps.</div>"
        f"<p>Your role in <strong>{escape(company.name)}</strong> is "
        f"{escape(ROLE_LABELS.get(user.companies.get(company.realm_id, ''), 'unknown'))}. "
        f"Ask an admin to connect the app for you: {escape(who)}.</p>"
        '<div class="actions">' + _consent_form(flow_id, "back-to-app", "Back to app", "deny") + "</div>"
    )
    return _layout("Admin required", body, flow_id=flow_id, user=user)


def _scope_list(scopes: list[str]) -> str:
    items = "".join(f'<li data-scope="{escape(s)}">{escape(SCOPE_LABELS.get(s, s))}</li>' for s in scopes)
    return f'<ul class="scopes" id="scopes">{items}</ul>'


def authorize_page(
    flow_id: str, user: User, company: Company | None, app_name: str, scopes: list[str]
) -> str:
    target = company.name if company else "your Intuit account"
    body = (
        f'<h1 id="authorize-title">{escape(app_name)} wants to connect to {escape(target)}</h1>'
        f"<p>By clicking Connect, you authorize {escape(app_name)} to access:</p>"
        f"{_scope_list(scopes)}"
        '<p class="muted">You can disconnect the app at any time from the Apps page in '
        "QuickBooks.</p>"
        '<div class="actions">'
        + _consent_form(flow_id, "cancel", "Cancel", "deny", secondary=True)
        + _consent_form(flow_id, "connect", "Connect", "allow")
        + "</div>"
    )
    return _layout("Connect", body, flow_id=flow_id, user=user)


def switch_admin_page(
    flow_id: str, user: User, company: Company, app_name: str, other: User | None, scopes: list[str]
) -> str:
    other_desc = f"{other.name} ({other.email})" if other else "another user"
    body = (
        f"<h1>{escape(app_name)} is already connected to {escape(company.name)}</h1>"
        f'<div class="warning" id="switch-admin"><strong>{escape(other_desc)}</strong> '
        f"connected {escape(app_name)} to this company.</div>"
        f"<p>If you connect anyway, you become the admin for this connection and the "
        f"connection made by {escape(other.name if other else 'the other user')} stops working."
        f" {escape(app_name)} will be able to access:</p>"
        f"{_scope_list(scopes)}"
        '<div class="actions">'
        + _consent_form(flow_id, "cancel", "Cancel", "deny", secondary=True)
        + _consent_form(flow_id, "connect-anyway", "Connect anyway", "allow", connect_anyway=True)
        + "</div>"
    )
    return _layout("Switch admin", body, flow_id=flow_id, user=user)
