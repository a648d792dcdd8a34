"""Settings live in ~/.myapp/config (per user) or /etc/myapp.conf (system-wide).

Without a jail these tests write into the real home directory and, as root, into the real /etc,
and they leave the files there: test_defaults_when_nothing_is_configured then fails on every
later run, and test_save_system_settings fails whenever the user file was written first.
In a jail the host's / is read-only, so the app falls back to a temp file in the jail's private
/tmp, which disappears with the jail. Nothing reaches the host, and every test starts clean.
"""

import myapp


def test_defaults_when_nothing_is_configured():
    assert myapp.load_settings() == myapp.DEFAULTS


def test_save_user_settings():
    myapp.save_settings({"greeting": "howdy"})
    assert myapp.load_settings() == {**myapp.DEFAULTS, "greeting": "howdy"}


def test_save_system_settings():
    myapp.save_settings({"color": "green"}, system=True)
    assert myapp.load_settings() == {**myapp.DEFAULTS, "color": "green"}
