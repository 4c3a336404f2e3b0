"""Braid, Prosody and ejabberd on 127.0.0.1 inside a loopback-only namespace of ours, with
one or many hosted domains and many accounts, for the c2s and hosting benchmarks.

Accounts are named as tsung names them: user1..userK with passwords pass1..passK. All
three servers store SCRAM-SHA-256 credentials with 4096 PBKDF2 iterations (Braid and
Prosody default to 10000, ejabberd to 4096; the same count and hash everywhere make logins
cost alike, and a SCRAM client such as braid-load uses SCRAM-SHA-256 on all three):
  - Braid: rows written into its SQLite `users` table (SHA-1 and SHA-256 keys), since
    `braid user add` takes ~90 ms per call (one process each);
  - Prosody: internal_hashed account files (what prosodyctl would write), with
    `password_hash = "SHA-256"`, without which 0.12 keeps SHA-1 keys and offers only
    SCRAM-SHA-1;
  - ejabberd: ejabberd_auth:try_register over Erlang distribution, all in one call, with
    `auth_scram_hash: sha256`.
"""

import hashlib
import hmac
import multiprocessing
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import time

from common import lab, log

ITERATIONS = 4096
C2S_PORT = 5222
ADDRESS = "127.0.0.1"


def scram_keys(password, salt, hash_name):
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored = hashlib.new(hash_name, client_key).digest()
    server = hmac.new(salted, b"Server Key", hash_name).digest()
    return stored, server


def _braid_row(args):
    index, domain, now = args
    password = f"pass{index}"
    salt1, salt256 = os.urandom(16), os.urandom(16)
    s1, k1 = scram_keys(password, salt1, "sha1")
    s256, k256 = scram_keys(password, salt256, "sha256")
    return (f"user{index}@{domain}", domain, salt1, ITERATIONS, s1, k1, salt256, ITERATIONS, s256, k256, 0, now)


def _prosody_file(args):
    index, directory = args
    salt = os.urandom(12).hex()
    stored, server = scram_keys(f"pass{index}", salt.encode(), "sha256")
    with open(os.path.join(directory, f"user{index}.dat"), "w") as handle:
        handle.write('return {\n\t["iteration_count"] = %d;\n\t["salt"] = "%s";\n\t["stored_key"] = "%s";\n'
                     '\t["server_key"] = "%s";\n};\n' % (ITERATIONS, salt, stored.hex(), server.hex()))


def self_signed(directory, name, domains):
    """An EC P-256 self-signed certificate for DOMAINS; returns (cert, key) paths."""
    os.makedirs(directory, exist_ok=True)
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    san = ",".join(f"DNS:{d}" for d in domains[:50])
    lab.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={domains[0]}", "-addext",
             f"subjectAltName={san}"])
    return cert, key


def stream_answer(ns, port, domain, timeout=2.0):
    """'features' / 'host-unknown' / None for a client stream to DOMAIN, opened inside NS."""
    script = (
        "import socket,sys,time\n"
        "try:\n"
        f" s=socket.create_connection(('{ADDRESS}',{port}),timeout={timeout})\n"
        f" s.sendall(b\"<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>\")\n"
        " d=b'';e=time.monotonic()+%s\n"
        " while time.monotonic()<e:\n"
        "  c=s.recv(4096)\n"
        "  if not c: break\n"
        "  d+=c\n"
        "  if b'features' in d: print('features'); break\n"
        "  if b'host-unknown' in d: print('host-unknown'); break\n"
        "except OSError: pass\n" % timeout)
    out = subprocess.run(lab.in_netns(ns, ["/usr/bin/python3", "-c", script]), capture_output=True, text=True,
                         timeout=timeout + 10)
    return out.stdout.strip() or None


class LocalServer:
    """Base: a server of KIND hosting DOMAINS in namespace NS, data under DIRECTORY."""

    kind = None

    def __init__(self, ns, directory, domains):
        self.ns = ns
        self.directory = directory
        self.domains = domains
        self.service = None
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)

    @property
    def pid(self):
        return self.service.pid

    def add_users(self, count):
        raise NotImplementedError

    def stop(self):
        if self.service is not None:
            self.service.stop()
            self.service = None

    def wait_ready(self, timeout=600, domain=None):
        """Seconds until a stream to DOMAIN (default the first) gets features."""
        domain = domain or self.domains[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.service.running():
                raise lab.LabError(f"{self.kind} exited during start-up: {lab.log_tail(self.service.log_path, 20)}")
            if stream_answer(self.ns, C2S_PORT, domain, timeout=1.0) == "features":
                return True
            time.sleep(0.05)
        return False


class BraidServer(LocalServer):
    kind = "braid"

    def __init__(self, ns, directory, domains, binary, extra_env=None):
        super().__init__(ns, directory, domains)
        self.binary = binary
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BRAID_")}
        self.env.update({
            "BRAID_DATA_DIRECTORY": os.path.join(directory, "data"),
            "BRAID_DEFAULT_DOMAIN": domains[0],
            "BRAID_LOG_LEVEL": "warning",
            "BRAID_C2S_ADDRESS": ADDRESS,
            "BRAID_C2S_STARTTLS_PORT": str(C2S_PORT),
            "BRAID_C2S_DIRECT_TLS_PORT": "5223",
            "BRAID_S2S_ENABLED": "false",
            "BRAID_ADMIN_ADMIN_ADDRESS": ADDRESS,
            "BRAID_ADMIN_POSH_ADDRESS": ADDRESS,
            "BRAID_ADMIN_POSH_PORT": "5443",
            "BRAID_AUTH_SCRAM_ITERATIONS": str(ITERATIONS),
        })
        self.env.update(extra_env or {})
        names = os.path.join(directory, "domains.txt")
        with open(names, "w") as handle:
            handle.write("\n".join(domains) + "\n")
        lab.run([binary, "domain", "add", "--file", names], env=self.env, timeout=600)

    def cli(self, *args):
        return lab.run([self.binary, *args], env=self.env, timeout=120)

    def add_users(self, count):
        # One account through the CLI (creates the schema and shows the row format), the
        # rest as rows of the same shape.
        domain = self.domains[0]
        self.cli("user", "add", f"user1@{domain}", "--password", "pass1")
        now = int(time.time())
        with multiprocessing.Pool(os.cpu_count()) as pool:
            rows = pool.map(_braid_row, [(i, domain, now) for i in range(2, count + 1)], chunksize=200)
        db = sqlite3.connect(os.path.join(self.directory, "data", "braid.sqlite"), timeout=30)
        with db:
            db.executemany("INSERT INTO users (jid, domain, sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, "
                           "sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key, roster_version, created_at) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.close()

    def start(self):
        self.service = lab.Service("braid", lab.in_netns(self.ns, [self.binary, "serve"]),
                                   os.path.join(self.directory, "braid.log"), env=self.env, cwd=self.directory)

    def add_domain_live(self, domain):
        self.cli("domain", "add", domain)


class ProsodyServer(LocalServer):
    kind = "prosody"

    def __init__(self, ns, directory, domains, muc=None, network=None):
        super().__init__(ns, directory, domains)
        # muc: None (no group chat) or the options of a `Component "conference.DOMAIN" "muc"`
        # written after each VirtualHost ({} for Prosody's defaults). network: more
        # network_settings (net.server_epoll's options) beside the backlog.
        self.muc = muc
        self.network = dict(network or {})
        self.config = os.path.join(directory, "prosody.cfg.lua")
        self.data = os.path.join(directory, "data")
        self.certs = os.path.join(directory, "certs")
        os.makedirs(self.data, exist_ok=True)
        cert, key = self_signed(self.certs, "server", domains)
        self.write_config()
        lab.chown_tree(directory, "prosody")

    def write_config(self):
        text = f"""-- braid benchmarks: generated
pidfile = "{self.directory}/prosody.pid"
daemonize = false
data_path = "{self.data}"
log = {{ {{ levels = {{ min = "warn" }}, to = "file", filename = "{self.directory}/prosody.log" }} }}
admin_socket = "{self.directory}/prosody.sock"
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "posix", "admin_shell" }}
modules_disabled = {{ "s2s" }}
interfaces = {{ "{ADDRESS}" }}
c2s_ports = {{ {C2S_PORT} }}
network_settings = {{ tcp_backlog = 1024{"".join(f"; {k} = {_lua(v)}" for k, v in sorted(self.network.items()))} }}
ssl = {{ certificate = "{self.certs}/server.crt", key = "{self.certs}/server.key" }}
c2s_require_encryption = true
authentication = "internal_hashed"
password_hash = "SHA-256"
storage = "internal"
allow_registration = false
"""
        text += "".join(f'VirtualHost "{d}"\n' for d in self.domains)
        if self.muc is not None:
            options = "".join(f"\t{key} = {_lua(value)}\n" for key, value in sorted(self.muc.items()))
            text += "".join(f'Component "conference.{d}" "muc"\n{options}' for d in self.domains)
        lab.write_file(self.config, text, 0o640)

    def add_users(self, count):
        encoded = "".join(c if c.isalnum() else "%%%02x" % ord(c) for c in self.domains[0])
        directory = os.path.join(self.data, encoded, "accounts")
        os.makedirs(directory, exist_ok=True)
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(_prosody_file, [(i, directory) for i in range(1, count + 1)], chunksize=200)
        lab.chown_tree(self.data, "prosody")

    def start(self):
        env = dict(os.environ)
        self.service = lab.Service("prosody", lab.in_netns(self.ns, lab.as_user("prosody", ["prosody", "--config", self.config, "-F"])),
                                   os.path.join(self.directory, "prosody.out"), env=env, cwd=self.directory)

    def add_domain_live(self, domain):
        """The VirtualHost appended to the config, then `prosodyctl shell host:activate(...)`
        (a reload alone does not start new hosts in 0.12); the shell's start is included."""
        self.domains.append(domain)
        self.write_config()
        lab.chown_tree(self.directory, "prosody")
        lab.run(lab.in_netns(self.ns, lab.as_user("prosody", ["prosodyctl", "--config", self.config, "shell",
                                                              f"host:activate('{domain}')"])), timeout=120)


def _session_pids(sid, comm_prefix):
    from common import session_members
    pids = []
    for pid in session_members(sid):
        try:
            with open(f"/proc/{pid}/comm") as handle:
                if handle.read().strip().startswith(comm_prefix):
                    pids.append(pid)
        except OSError:
            pass
    return pids


class EjabberdServer(LocalServer):
    kind = "ejabberd"
    node = "ejabberd@localhost"
    dist_port = 4370

    def __init__(self, ns, directory, domains, muc=None):
        super().__init__(ns, directory, domains)
        # muc: None (no group chat) or mod_muc's options; its host is conference.@HOST@.
        self.muc = muc
        self.etc = os.path.join(directory, "etc")
        self.config = os.path.join(self.etc, "ejabberd.yml")
        self.ctl = os.path.join(self.etc, "ejabberdctl.cfg")
        self.spool = os.path.join(directory, "spool")
        self.logs = os.path.join(directory, "logs")
        for path in (self.etc, self.spool, self.logs):
            os.makedirs(path, exist_ok=True)
        cert, key = self_signed(os.path.join(directory, "certs"), "server", domains)
        self.pem = os.path.join(self.etc, "server.pem")
        with open(self.pem, "w") as pem:
            for path in (cert, key):
                with open(path) as part:
                    pem.write(part.read())
        lab.write_file(os.path.join(self.spool, ".erlang.cookie"), "braidbenchcookie", 0o400)
        lab.write_file(self.ctl, f"""ERLANG_NODE={self.node}
ERL_DIST_PORT={self.dist_port}
INET_DIST_INTERFACE=127.0.0.1
EJABBERD_PID_PATH={directory}/ejabberd.pid
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
ERL_MAX_PORTS=65536
ERL_PROCESSES=2000000
EJABBERD_BYPASS_WARNINGS=true
""")
        self.write_config()
        lab.chown_tree(directory, "ejabberd")
        os.chmod(directory, 0o755)

    def write_config(self):
        hosts = "\n".join(f"  - {d}" for d in self.domains)
        lab.write_file(self.config, f"""# braid benchmarks: generated
hosts:
{hosts}
loglevel: warning
log_rotate_count: 0
certfiles:
  - "{self.pem}"
listen:
  - port: {C2S_PORT}
    ip: "{ADDRESS}"
    module: ejabberd_c2s
    starttls_required: true
    backlog: 1024
    max_stanza_size: 262144
auth_method: internal
auth_password_format: scram
auth_scram_hash: sha256
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
{self._muc_yaml()}""", 0o640)
        lab.chown_tree(self.directory, "ejabberd")

    def _muc_yaml(self):
        if self.muc is None:
            return ""
        lines = ["  mod_muc:", '    host: "conference.@HOST@"']
        for key, value in sorted(self.muc.items()):
            if isinstance(value, dict):
                lines.append(f"    {key}:")
                lines += [f"      {k}: {v}" for k, v in sorted(value.items())]
            else:
                lines.append(f"    {key}: {value}")
        return "\n".join(lines) + "\n"

    def _env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL", "EJABBERD"))}
        env["HOME"] = self.spool
        return env

    def _ctl(self):
        return ["ejabberdctl", "--config-dir", self.etc, "--ctl-config", self.ctl, "--config", self.config,
                "--spool", self.spool, "--logs", self.logs, "--node", self.node]

    def start(self):
        self.service = lab.Service("ejabberd", lab.in_netns(self.ns, lab.as_user("ejabberd", self._ctl() + ["foreground"])),
                                   os.path.join(self.logs, "ejabberd.out"), env=self._env(), cwd=self.spool,
                                   nofile=lab_nofile())

    def _erl(self, program, timeout=900):
        argv = ["erl", "-sname", f"benchctl{random.randint(0, 99999)}@localhost", "-hidden", "-noinput",
                "-erl_epmd_port", str(self.dist_port), "-start_epmd", "false", "-dist_listen", "false",
                "-eval", program]
        return lab.run(lab.in_netns(self.ns, lab.as_user("ejabberd", argv)), check=False, env=self._env(),
                       cwd=self.spool, timeout=timeout)

    def add_users(self, count):
        domain = self.domains[0]
        program = (
            f"Node = '{self.node}', "
            f"Bad = rpc:call(Node, lists, filter, [fun(I) -> "
            f"ejabberd_auth:try_register(list_to_binary(\"user\" ++ integer_to_list(I)), <<\"{domain}\">>, "
            f"list_to_binary(\"pass\" ++ integer_to_list(I))) =/= ok end, lists:seq(1, {count})], 900000), "
            "io:format(\"~p~n\", [length(Bad)]), halt(case Bad of [] -> 0; _ -> 1 end).")
        result = self._erl(program)
        if result.returncode != 0:
            raise lab.LabError(f"ejabberd registration failed: {(result.stdout + result.stderr)[-800:]}")

    def add_domain_live(self, domain):
        """ejabberd adds hosts on reload_config (over distribution, like ejabberdctl)."""
        self.domains.append(domain)
        self.write_config()
        result = self._erl(f"R = rpc:call('{self.node}', ejabberd_admin, reload_config, [], 600000), "
                           "io:format(\"~p~n\", [R]), halt(0).", timeout=620)
        return result.stdout.strip()


def _lua(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"%s"' % value


def start_with_users(kind, ns, directory, domains, users, braid_binary, braid_env=None, options=None, timeout=120):
    """A server of KIND for DOMAINS with USERS accounts (user1..userN on the first domain),
    started and answering on 5222. ejabberd registers its accounts over distribution, so
    after its start; the others before. braid_env: Braid's extra environment; options:
    Prosody's or ejabberd's extra constructor arguments (muc=..., network=...)."""
    if kind == "braid":
        server = BraidServer(ns, directory, domains, braid_binary, extra_env=braid_env)
    else:
        server = SERVERS[kind](ns, directory, domains, **(options or {}))
    if kind != "ejabberd":
        server.add_users(users)
    server.start()
    if not server.wait_ready(timeout):
        server.stop()
        raise lab.LabError(f"{kind} did not answer on {C2S_PORT}")
    if kind == "ejabberd":
        try:
            server.add_users(users)
        except Exception:
            server.stop()
            raise
    return server


def lab_nofile():
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


SERVERS = {"braid": BraidServer, "prosody": ProsodyServer, "ejabberd": EjabberdServer}
