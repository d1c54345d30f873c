"""An independent SMTP server (aiosmtpd) for the interop test of tests/it/alerts.rs (ignored by
default; .ci/run runs it with `cargo test --test it alerts:: -- --ignored`).

    python3 tests/smtp_sink.py PORT DIR [USER PASSWORD]

Listens on 127.0.0.1:PORT and writes each message it accepts to DIR as one JSON file
(envelope, decoded subject and text body, the raw message, the authenticated user), written
to a temporary name and renamed, so a reader never sees half a file. With USER and PASSWORD,
AUTH (PLAIN/LOGIN, allowed without TLS on this loopback test server) is required and checked.
Prints "READY" once listening; runs until killed.
"""

import email
import email.policy
import json
import os
import sys
import threading
import time
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "replace")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "subject": str(msg.get("subject", "")),
            "from": str(msg.get("from", "")),
            "to": str(msg.get("to", "")),
            "body": body.get_content() if body is not None else "",
            "raw": raw.decode("utf-8", "replace"),
            "auth_user": session.auth_data.login.decode()
            if isinstance(session.auth_data, LoginPassword)
            else None,
        }
        with self.lock:
            self.count += 1
            name = "%d-%05d.json" % (time.time_ns(), self.count)
        path = os.path.join(self.directory, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 Message accepted"


def main():
    # AUTH without TLS is what this loopback-only test server is for.
    warnings.filterwarnings("ignore")
    port, directory = int(sys.argv[1]), sys.argv[2]
    user = sys.argv[3].encode() if len(sys.argv) > 4 else None
    password = sys.argv[4].encode() if len(sys.argv) > 4 else None

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user
            and auth_data.password == password
        )
        return AuthResult(success=ok, auth_data=auth_data if ok else None)

    kwargs = {}
    if user is not None:
        kwargs = dict(
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=False,
        )
    controller = Controller(Sink(directory), hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
