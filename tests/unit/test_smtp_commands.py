"""The MAIL FROM and RCPT TO arguments SMTPMailer writes itself must be exactly smtplib's.

``SMTPMailer`` writes ``<address>`` for an address of plain characters
instead of calling ``smtplib.quoteaddr`` (which parses it first). That is
only right if smtplib would have written the same: checked here for every
string Hypothesis builds from the plain alphabet, and the other addresses
must be left to smtplib.
"""

import smtplib
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from mailspool.mailer import _PLAIN_ADDRESS

PLAIN_CHARACTERS = string.ascii_letters + string.digits + ".!#$%&'*+/=?^_`{|}~@-"
ADDRESS_SHAPED = st.builds(
    lambda local, domain, at: local + at + domain,
    st.text(PLAIN_CHARACTERS, max_size=20), st.text(PLAIN_CHARACTERS, max_size=20), st.sampled_from(["@", "", "@@"]),
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.text(PLAIN_CHARACTERS, max_size=40), ADDRESS_SHAPED))
def test_a_plain_address_is_written_as_smtplib_writes_it(address):
    assert _PLAIN_ADDRESS.match(address)
    assert f"<{address}>" == smtplib.quoteaddr(address)


def test_addresses_smtplib_must_parse_are_not_plain():
    for address in ["Alice <alice@example.org>", "<alice@example.org>", "alice@example.org (Alice)",
                    '"a b"@example.org', "alice @example.org", "élodie@example.org", "a,b@example.org",
                    "alice@[127.0.0.1]", "alice@example.org\r\nRCPT TO:<x@y>"]:
        assert not _PLAIN_ADDRESS.match(address), address
