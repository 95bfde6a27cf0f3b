"""Login and logout (the login form's CSRF is a double-submit cookie; failures count as on /token)."""

from __future__ import annotations

import hmac
import secrets

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from nagaya.errors import AuthError, TooManyAttempts
from nagaya.server.base import NOTES
from nagaya.server.portal.base import DEVICE_COOKIE, DEVICE_DAYS, LOGIN_COOKIE, Portal, client_address, secure
from nagaya.server.portal.sessions import COOKIE
from nagaya.sitedb.service import SiteService


def router(portal: Portal) -> APIRouter:
    site, settings, sessions, sess_of = portal.site, portal.site.settings, portal.sessions, portal.sess_of
    need_csrf, page = portal.need_csrf, portal.page
    r = portal.router()

    @r.get("/", response_class=HTMLResponse)
    def root(request: Request) -> Response:
        return RedirectResponse("/dashboard" if sessions.get(request.cookies.get(COOKIE)) else "/login",
                                status_code=303)

    def login_page(request: Request, error: str = "", status: int = 200, username: str = "",
                   next: str | None = None) -> HTMLResponse:
        token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
        out = page(request, "login.html", None, "", status=status, error=error, login_csrf=token,
                   next=request.query_params.get("next", "") if next is None else next, username=username,
                   auth=settings.auth)
        out.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict", secure=secure(request))
        return out

    @r.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        if sessions.get(request.cookies.get(COOKIE)):
            return RedirectResponse("/dashboard", status_code=303)
        return login_page(request)

    @r.post("/login", response_class=HTMLResponse)
    def login(request: Request, username: str = Form(""), password: str = Form(""), csrf: str = Form(""),
              next: str = Form("")) -> Response:
        # Login CSRF: the form's token must match the cookie set with the form (double submit).
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), csrf.encode()):
            return login_page(request, "Your login form expired. Please try again.", 400, username, next)
        username = username.strip()
        try:            # counts failures and refuses guessers (Site.password_login), as /token and the API do
            with site.db.session() as db:
                p = site.password_login(SiteService(db), username, password, client_address(request), "portal",
                                        request.cookies.get(DEVICE_COOKIE))
        except TooManyAttempts as e:
            return login_page(request, f"Too many failed attempts. Please {e.message.split('; ')[1]}, or log in "
                              "from a browser you logged in with before.", 429, username, next)
        except AuthError as e:
            msg = e.message if "expired" in e.message else "Wrong username or password."
            return login_page(request, msg, 401, username, next)
        s = sessions.create(p.name, p.groups, p.is_admin)
        request.state.web_session = s                  # its first messages are saved with it (PortalRoute)
        # an account about to expire: say so on the first page
        if (warning := (NOTES.get() or {}).get("warning")):
            s.flash.append(("warn", warning))
        dest = next if next.startswith("/") and not next.startswith("//") else "/dashboard"
        out = RedirectResponse(dest, status_code=303)
        out.set_cookie(COOKIE, s.sid, httponly=True, samesite="lax", secure=secure(request), path="/")
        out.set_cookie(DEVICE_COOKIE, site.devices.issue(p.name), max_age=DEVICE_DAYS * 86400, httponly=True,
                       samesite="strict", secure=secure(request), path="/login")
        out.delete_cookie(LOGIN_COOKIE)
        return out

    @r.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        s = sess_of(request)
        need_csrf(request, s, csrf)
        sessions.drop(s.sid)
        with site.db.session() as db:
            SiteService(db).audit("logout", s.user, details={"via": "portal"})
        out = RedirectResponse("/login", status_code=303)
        out.delete_cookie(COOKIE, path="/")
        return out

    return r
