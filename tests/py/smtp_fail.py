"""An aiosmtpd handler answering chosen recipients with SMTP errors, for the email task's tests:
tempfail@… gets 451 at RCPT, permfail@… 550, datafail@… 452 at DATA; anyone else 250."""


class FailHandler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local == "tempfail":
            return "451 4.3.0 Temporary failure, try again later"
        if local == "permfail":
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(r.startswith("datafail@") for r in envelope.rcpt_tos):
            return "452 4.3.1 Insufficient system storage"
        return "250 Message accepted for delivery"
