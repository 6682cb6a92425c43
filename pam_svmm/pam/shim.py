"""The file a PAM rule names: makes the product's virtualenv importable and hands over.

    auth required pam_python.so /usr/lib/svmm/pam_svmm.py [venv=/opt/svmm/venv] [config=PATH]
        [daemon=auto|required|off] [socket=/run/svmm/launcher.sock]

pam_python runs this with Debian's /usr/bin/python3, so the venv made from that interpreter
is put first on sys.path. If the product cannot be imported the answer is PAM_SYSTEM_ERR: an
import failure must never become a success (or a silent ignore).

Each call goes first to svmmd when it runs (pam/thin.py: the fast path, which imports almost
nothing here); ``daemon=auto`` (default) runs the call in this process when svmmd is not
there, ``required`` refuses then (PAM_AUTHINFO_UNAVAIL; PAM_SESSION_ERR for sessions),
``off`` never asks svmmd. Only root's PAM applications use svmmd; others run in-process.
"""

from __future__ import annotations

import site
import sys

DEFAULT_VENV = "/opt/svmm/venv"


def _venv(argv):
    for arg in argv[1:]:
        if arg.startswith("venv="):
            return arg[len("venv=") :]
    return DEFAULT_VENV


def _venv_path(argv):
    root = _venv(argv)
    lib = f"{root}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    if lib not in sys.path:
        # addsitedir appends (and runs the venv's .pth files); move what it added to the
        # front so the venv's packages win over Debian's dist-packages (whose cryptography,
        # for one, is too old).
        before = list(sys.path)
        site.addsitedir(lib)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before


def _entry(argv):
    _venv_path(argv)
    from pam_svmm.pam import entry

    return entry


def _thin(argv):
    _venv_path(argv)
    from pam_svmm.pam import thin

    return thin


def _call(name, pamh, flags, argv):
    import os

    try:
        thin = _thin(argv)
        options = thin.ModuleOptions(argv)
        if not options.valid:
            raise ValueError("daemon= must be auto, required or off")
        if options.daemon != "off" and os.geteuid() == 0:
            code = thin.call(name[len("pam_sm_") :], pamh, flags, options)
            if code is not None:
                return code
            if options.daemon == "required":
                session = name.endswith("_session")
                return pamh.PAM_SESSION_ERR if session else pamh.PAM_AUTHINFO_UNAVAIL
    except Exception as e:
        import syslog

        syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_ERR, f"pam_svmm cannot ask svmmd: {type(e).__name__}: {e}")
        return pamh.PAM_SESSION_ERR if name.endswith("_session") else pamh.PAM_SYSTEM_ERR
    try:
        entry = _entry(argv)
    except Exception as e:
        import syslog

        syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_ERR, f"pam_svmm cannot be imported: {type(e).__name__}")
        return pamh.PAM_SYSTEM_ERR
    return getattr(entry, name)(pamh, flags, argv)


def pam_sm_authenticate(pamh, flags, argv):
    return _call("pam_sm_authenticate", pamh, flags, argv)


def pam_sm_setcred(pamh, flags, argv):
    return _call("pam_sm_setcred", pamh, flags, argv)


def pam_sm_acct_mgmt(pamh, flags, argv):
    return _call("pam_sm_acct_mgmt", pamh, flags, argv)


def pam_sm_open_session(pamh, flags, argv):
    return _call("pam_sm_open_session", pamh, flags, argv)


def pam_sm_close_session(pamh, flags, argv):
    return _call("pam_sm_close_session", pamh, flags, argv)
