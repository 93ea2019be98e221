"""A next hop for the delivery tests, built on aiosmtpd: it records each message it accepts as
one JSON line, and can be told to refuse in the ways a real next hop does.

    smtp_peer.py --host 127.0.0.1 --port 2526 --log FILE [--tempfail-first N]
                 [--reject-rcpt TEXT] [--delay SECONDS] [--size-limit OCTETS] [--dsn]
                 [--max-rcpts N] [--no-8bitmime] [--no-smtputf8] [--close-rcpt TEXT]
                 [--tls-cert PEM --tls-key PEM]

--port 0 picks a free port. --tempfail-first N answers 451 to the first N deliveries of each message (by Message-ID);
--reject-rcpt TEXT answers 550 5.1.1 to recipients containing TEXT; --close-rcpt TEXT answers
421 to them and closes the connection, as a server going down does. --max-rcpts N answers
"552 5.5.3 Too many recipients" to each RCPT after the N-th of a transaction, as older servers
do (RFC 5321 4.5.3.1.10). --no-8bitmime leaves 8BITMIME out of the EHLO reply, --no-smtputf8 SMTPUTF8. --dsn offers DSN (RFC 3461)
in EHLO and records the DSN parameters of MAIL and of each RCPT (without it, aiosmtpd refuses
them with 555, as a server without DSN should). --tls-cert and --tls-key offer STARTTLS with
that certificate (OpenSSL's, through Python's ssl module), and each record says whether its
session was in TLS. It prints "ready" once it listens
("ready PORT") and runs until stdin closes.
"""

import argparse
import asyncio
import base64
import json
import re
import socket
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class Handler:
    def __init__(self, args):
        self.args = args
        self.attempts = {}
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.args.dsn:
            responses.insert(1, "250-DSN")
        if self.args.no_8bitmime:
            responses = [r for r in responses if r != "250-8BITMIME"]
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.args.reject_rcpt and self.args.reject_rcpt in address:
            return "550 5.1.1 <%s>: no such user here" % address
        if self.args.close_rcpt and self.args.close_rcpt in address:
            # The reply is written first; the close follows on the next turn of the loop.
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "421 4.3.2 %s going down" % self.args.host
        if self.args.max_rcpts and len(envelope.rcpt_tos) >= self.args.max_rcpts:
            return "552 5.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or b""
        message_id = ""
        for line in data.split(b"\r\n"):
            if not line:
                break
            if line.lower().startswith(b"message-id:"):
                message_id = line.split(b":", 1)[1].strip().decode("ascii", "replace")
        if self.args.delay:
            await asyncio.sleep(self.args.delay)
        with self.lock:
            seen = self.attempts.get(message_id, 0)
            self.attempts[message_id] = seen + 1
        if seen < self.args.tempfail_first:
            return "451 4.3.0 Try again later"
        record = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "dsn_mail": getattr(envelope, "dsn_mail", []),
            "dsn_rcpts": getattr(envelope, "dsn_rcpts", []),
            "message_id": message_id,
            "tls": getattr(session, "ssl", None) is not None,
            "size": len(data),
            "data": base64.b64encode(data).decode("ascii"),
        }
        with self.lock, open(self.args.log, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        return "250 2.0.0 Ok: stored"


DSN_KEYWORD = re.compile(r"\s+(RET|ENVID|NOTIFY|ORCPT)=(\S+)", re.IGNORECASE)


def strip_dsn(arg):
    """Takes the DSN parameters out of a MAIL or RCPT argument: (rest, ["KEY=value", ...])."""
    found = [f"{m.group(1).upper()}={m.group(2)}" for m in DSN_KEYWORD.finditer(arg)]
    return DSN_KEYWORD.sub("", arg), found


class DsnSMTP(SMTP):
    """aiosmtpd's server, taking the DSN parameters (which aiosmtpd itself does not know)."""

    async def smtp_MAIL(self, arg):
        rest, found = strip_dsn(arg or "")
        await super().smtp_MAIL(rest if found else arg)
        if found and self.envelope.mail_from is not None:
            self.envelope.dsn_mail = found

    async def smtp_RCPT(self, arg):
        rest, found = strip_dsn(arg or "")
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(rest if found else arg)
        if len(self.envelope.rcpt_tos) > before:
            if not hasattr(self.envelope, "dsn_rcpts"):
                self.envelope.dsn_rcpts = []
            self.envelope.dsn_rcpts.append(found)


class EightBitController(Controller):
    def __init__(self, handler, size_limit, dsn=False, smtputf8=True, tls=None, **kw):
        self.size_limit = size_limit
        self.dsn = dsn
        self.smtputf8 = smtputf8
        self.tls = tls
        super().__init__(handler, **kw)

    def factory(self):
        return (DsnSMTP if self.dsn else SMTP)(
            self.handler,
            decode_data=False,
            enable_SMTPUTF8=self.smtputf8,
            ident="test peer",
            # Named, not looked up: the machine's own name may take seconds to resolve.
            hostname="peer.test",
            data_size_limit=self.size_limit,
            tls_context=self.tls,
        )


def free_port(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True)
    p.add_argument("--tempfail-first", type=int, default=0)
    p.add_argument("--reject-rcpt", default="")
    p.add_argument("--close-rcpt", default="")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--size-limit", type=int, default=33554432)
    p.add_argument("--dsn", action="store_true")
    p.add_argument("--max-rcpts", type=int, default=0)
    p.add_argument("--no-8bitmime", action="store_true")
    p.add_argument("--no-smtputf8", action="store_true")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    args = p.parse_args()
    tls = None
    if args.tls_cert:
        import ssl
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    # Port 0: a free port of our own choosing, tried again if another process takes it
    # between the probe and the bind (bounded).
    handler = Handler(args)
    for attempt in range(20):
        port = args.port or free_port(args.host)
        controller = EightBitController(
            handler,
            args.size_limit,
            dsn=args.dsn,
            smtputf8=not args.no_smtputf8,
            tls=tls,
            hostname=args.host,
            port=port,
        )
        try:
            controller.start()
            break
        except Exception:
            if args.port or attempt == 19:
                raise
    print(f"ready {port}", flush=True)
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    main()
