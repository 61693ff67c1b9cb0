"""How the ledger reaches a NATS cluster: a URL (one server or several, comma-separated) and `ConnectionOptions`
(user and password, a token or a creds file; TLS with a CA file and a client certificate), checked up front and
turned into keyword arguments for `nats.connect` by `connect_arguments`. Every place that takes a URL takes
these options too (`add_arguments` / `options_from_arguments` for the command line).

Credentials may be in the URL (`nats://user:password@host:4222`, `nats://token@host:4222`, percent-encoded) or
given as options, not both. They are taken out of the URLs and passed as options, decoded: nats-py would send
a URL's percent-escapes as they are. Error messages never show a password or a token."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import ssl
import urllib.parse
from typing import Any

SCHEMES = ("nats", "tls")
DEFAULT_PORT = 4222
CREDS_MARKERS = ("-----BEGIN NATS USER JWT-----", "-----BEGIN USER NKEY SEED-----")
CREDS_FILE_BYTES_MAX = 1 << 16   # a creds file is a JWT and a seed: a few KiB
# The environment variables the nats CLI reads, so that secrets need not be on the command line (where `ps`
# shows them to every user of the machine).
ENVIRONMENT = {"user": "NATS_USER", "password": "NATS_PASSWORD", "token": "NATS_TOKEN", "creds_file": "NATS_CREDS",
               "tls_ca_file": "NATS_CA", "tls_cert_file": "NATS_CERT", "tls_key_file": "NATS_KEY"}


@dataclasses.dataclass(frozen=True)
class ConnectionOptions:
    """Authentication and TLS for a NATS connection; every field optional. One way to authenticate: `user` with
    `password`, or `token`, or `creds_file` (a decentralized-auth .creds file: user JWT and nkey seed). TLS:
    `tls_ca_file` to trust a private CA, `tls_cert_file` with `tls_key_file` for a client certificate,
    `tls_hostname` to check the server's certificate against another name than the URL's host. Any TLS option,
    or a tls:// URL, makes the connection TLS (the system's CAs unless `tls_ca_file`)."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None

    def uses_tls(self) -> bool:
        """Whether any TLS option is set."""
        return any(value is not None for value in (self.tls_ca_file, self.tls_cert_file, self.tls_key_file,
                                                   self.tls_hostname))


@dataclasses.dataclass(frozen=True)
class ServerURL:
    """One server of a URL list: the URL without credentials, and the credentials it carried (decoded)."""
    url: str
    scheme: str
    user: str | None
    password: str | None


def redacted(url: str) -> str:
    """`url` with any credentials replaced by `***` (for messages and logs)."""
    scheme, separator, rest = url.strip().partition("://")
    if not separator or "@" not in rest.split("/", 1)[0]:
        return url.strip()
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def parse_url(text: str) -> ServerURL:
    """One server URL, `nats://[credentials@]host[:port]` or `tls://...` (a bare `host[:port]` means nats://).
    Raises ValueError naming the (redacted) URL when it is not one."""
    text = text.strip()
    shown = redacted(text)
    parsed = urllib.parse.urlsplit(text if "://" in text else f"nats://{text}")
    if parsed.scheme not in SCHEMES:
        raise ValueError(f"NATS URL {shown}: the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"NATS URL {shown}: the port is not a number in [1, 65535]") from None
    if not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError(f"NATS URL {shown}: expected {parsed.scheme}://host:port")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    user = urllib.parse.unquote(parsed.username) if parsed.username is not None else None
    password = urllib.parse.unquote(parsed.password) if parsed.password is not None else None
    return ServerURL(f"{parsed.scheme}://{host}:{port}", parsed.scheme, user or None, password)


def parse_urls(url: str) -> list[ServerURL]:
    """The servers of a comma-separated URL list (at least one)."""
    servers = [parse_url(part) for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("no NATS URL given (nats://host:port, several separated by commas)")
    return servers


def _url_credentials(servers: list[ServerURL]) -> ConnectionOptions:
    """The credentials the URLs carry: the same on each URL that has any (a user alone is a token)."""
    found = {(server.user, server.password) for server in servers if server.user is not None or server.password}
    if not found:
        return ConnectionOptions()
    if len(found) > 1:
        raise ValueError("the NATS URLs carry different credentials: give them once, as options")
    user, password = found.pop()
    if user is None:
        raise ValueError(f"NATS URL {redacted(servers[0].url)}: a password without a user")
    return ConnectionOptions(token=user) if password is None else ConnectionOptions(user=user, password=password)


def _check_authentication(options: ConnectionOptions) -> None:
    if (options.user is None) != (options.password is None):
        raise ValueError("NATS authentication: a user needs a password and a password a user")
    ways = [options.user is not None, options.token is not None, options.creds_file is not None]
    if sum(ways) > 1:
        raise ValueError("NATS authentication: give one of user and password, a token or a creds file")
    for name in ("user", "password", "token"):
        if getattr(options, name) == "":
            raise ValueError(f"NATS authentication: the {name} is empty")


def _readable_file(path: str, what: str) -> str:
    """`path` if it is a regular file this process can read; FileNotFoundError / ValueError saying which option
    names it otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path} is not readable by this user")
    return path


def _check_creds_file(path: str) -> str:
    """A creds file that exists and holds a user JWT and an nkey seed, with the nkeys package nats-py signs with."""
    _readable_file(path, "NATS creds file")
    with open(path, "rb") as file:
        text = file.read(CREDS_FILE_BYTES_MAX).decode("utf-8", "replace")
    missing = [marker for marker in CREDS_MARKERS if marker not in text]
    if missing:
        raise ValueError(f"NATS creds file {path} is not a creds file (no {missing[0]!r} block)")
    if importlib.util.find_spec("nkeys") is None:
        raise ValueError('a NATS creds file needs the nkeys package: pip install -e ".[cluster]"')
    return path


def tls_context(options: ConnectionOptions) -> ssl.SSLContext:
    """A client TLS context that checks the server's certificate (against `tls_ca_file`, else the system's
    CAs) and presents the client certificate when one is given."""
    if (options.tls_cert_file is None) != (options.tls_key_file is None):
        raise ValueError("NATS TLS: a client certificate needs its key and a key its certificate")
    ca_file = options.tls_ca_file and _readable_file(options.tls_ca_file, "NATS TLS CA file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except ssl.SSLError as error:
        raise ValueError(f"NATS TLS CA file {ca_file} holds no usable certificate: {error.reason or error}") from None
    if options.tls_cert_file is not None and options.tls_key_file is not None:
        certificate = _readable_file(options.tls_cert_file, "NATS TLS certificate file")
        key = _readable_file(options.tls_key_file, "NATS TLS key file")
        try:
            context.load_cert_chain(certificate, key)
        except ssl.SSLError as error:
            raise ValueError(f"NATS TLS certificate {certificate} with key {key}: {error.reason or error}") from None
    return context


def connect_arguments(url: str, options: ConnectionOptions | None = None) -> dict[str, Any]:
    """Keyword arguments for `nats.connect(**arguments)`: `servers` (the URLs without credentials) and only the
    authentication and TLS arguments that are set. Raises ValueError (a bad URL or combination of options) or
    FileNotFoundError (a creds, CA, certificate or key file that is not there) before any connection is tried."""
    options = options or ConnectionOptions()
    servers = parse_urls(url)
    from_urls = _url_credentials(servers)
    if from_urls != ConnectionOptions() and (options.user or options.password or options.token or options.creds_file):
        raise ValueError("NATS credentials in both the URL and the options (or $NATS_USER, $NATS_TOKEN, "
                         "$NATS_CREDS): give them once")
    credentials = options if from_urls == ConnectionOptions() else dataclasses.replace(
        options, user=from_urls.user, password=from_urls.password, token=from_urls.token)
    _check_authentication(credentials)
    if len({server.scheme for server in servers}) > 1:
        raise ValueError("NATS URLs mix nats:// and tls://: use one scheme")
    arguments: dict[str, Any] = {"servers": [server.url for server in servers]}
    for name in ("user", "password", "token"):
        if getattr(credentials, name) is not None:
            arguments[name] = getattr(credentials, name)
    if credentials.creds_file is not None:
        arguments["user_credentials"] = _check_creds_file(credentials.creds_file)
    if options.uses_tls() or any(server.scheme == "tls" for server in servers):
        arguments["tls"] = tls_context(options)
        if options.tls_hostname is not None:
            arguments["tls_hostname"] = options.tls_hostname
    return arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection options of a command that takes a NATS URL; each defaults to the environment variable the
    nats CLI reads (ENVIRONMENT), so that secrets can stay off the command line."""
    group = parser.add_argument_group("NATS connection (defaults from the environment, as the nats CLI reads it)")
    helps = {"user": "user name", "password": "password (prefer $NATS_PASSWORD: ps shows arguments)",
             "token": "authentication token (prefer $NATS_TOKEN)", "creds_file": "a .creds file (user JWT and seed)",
             "tls_ca_file": "CA certificate(s) to check the servers against (PEM)",
             "tls_cert_file": "client certificate (PEM)", "tls_key_file": "the client certificate's key (PEM)"}
    flags = {"user": "--nats-user", "password": "--nats-password", "token": "--nats-token",
             "creds_file": "--nats-creds", "tls_ca_file": "--nats-tls-ca", "tls_cert_file": "--nats-tls-cert",
             "tls_key_file": "--nats-tls-key"}
    for name, flag in flags.items():
        group.add_argument(flag, dest=f"nats_{name}", metavar=name.split("_")[-1].upper(),
                           default=os.environ.get(ENVIRONMENT[name]) or None,
                           help=f"{helps[name]} (${ENVIRONMENT[name]})")
    group.add_argument("--nats-tls-hostname", dest="nats_tls_hostname", metavar="NAME",
                       help="the name the servers' certificates must carry (default: each URL's host)")


def options_from_arguments(arguments: argparse.Namespace) -> ConnectionOptions:
    """The ConnectionOptions of a command line parsed with add_arguments."""
    return ConnectionOptions(**{field.name: getattr(arguments, f"nats_{field.name}")
                                for field in dataclasses.fields(ConnectionOptions)})
