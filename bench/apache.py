"""Apache (Debian's apache2) serving `git http-backend` over HTTPS on 127.0.0.1, with a
throwaway CA, for bench/fleet.py --server https. Started from its own config in a temp
directory (no /etc/apache2, no systemd unit); runs until stop()."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# the tests' throwaway CA (cryptography): one certificate maker, not two
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from httpsgit import make_ca  # noqa: E402

MODULES = ("mpm_event", "authz_core", "ssl", "socache_shmcb", "cgid", "alias",
           "env")


class ApacheGit:
    def __init__(self, base: Path, project_root: Path, port: int) -> None:
        self.dir = base / "apache"
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        self.port = port
        self.ca, cert, key = make_ca(self.dir, "bench CA")
        os.chmod(key, 0o644)  # read by the workers (www-data) in this throwaway setup
        loads = "\n".join(f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so"
                          for m in MODULES)
        (self.dir / "httpd.conf").write_text(f"""{loads}
ServerRoot {self.dir}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {self.dir}/httpd.pid
ErrorLog {self.dir}/error.log
LogLevel warn
User www-data
Group www-data
ScriptSock {self.dir}/cgisock
SSLEngine on
SSLCertificateFile {cert}
SSLCertificateKeyFile {key}
SSLSessionCache shmcb:{self.dir}/ssl_scache(512000)
MaxRequestWorkers 400
ServerLimit 16
ThreadsPerChild 25
SetEnv GIT_PROJECT_ROOT {project_root}
SetEnv GIT_HTTP_EXPORT_ALL 1
SetEnv GIT_CONFIG_COUNT 1
SetEnv GIT_CONFIG_KEY_0 safe.directory
SetEnv GIT_CONFIG_VALUE_0 *
ScriptAlias /git/ /usr/lib/git-core/git-http-backend/
<Directory /usr/lib/git-core>
    Require all granted
</Directory>
""")
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> str | None:
        if shutil.which("apache2") is None and not os.path.exists("/usr/sbin/apache2"):
            return "apache2 is not installed (apt-get install apache2)"
        return None

    def start(self) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APACHE_RUN_DIR": str(self.dir),
               "APACHE_LOCK_DIR": str(self.dir), "APACHE_LOG_DIR": str(self.dir)}
        self.proc = subprocess.Popen(["/usr/sbin/apache2", "-f", str(self.dir / "httpd.conf"),
                                      "-DFOREGROUND"], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (self.dir / "httpd.pid").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = (self.dir / "error.log").read_text() if (self.dir / "error.log").exists() \
                    else ""
                raise RuntimeError(f"apache2 did not start: {err}{log}")
            time.sleep(0.1)
        time.sleep(0.5)

    def url(self, name: str, port: int | None = None) -> str:
        return f"https://127.0.0.1:{port or self.port}/git/{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
