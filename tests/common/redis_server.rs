//! A private `redis-server` per test: on a free loopback port, no persistence, killed by its
//! PID when dropped. Debian's `redis-server` package (`.ci/run` installs it).

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A key file with these 32-byte keys (the first seals), as `[shared] encryption_key_file`
/// reads it: one base64 key per line.
pub fn key_file(dir: &std::path::Path, name: &str, keys: &[u8]) -> std::path::PathBuf {
    use base64::Engine as _;
    let text: String = keys
        .iter()
        .map(|b| base64::engine::general_purpose::STANDARD.encode([*b; 32]) + "\n")
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    password: Option<String>,
    /// With TLS: the CA that signed its certificate (PEM).
    tls_ca: Option<String>,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        Self::start_with(None, None).await
    }

    /// With `requirepass`, and/or on a given port (to restart one on the same port).
    pub async fn start_with(password: Option<&str>, port: Option<u16>) -> RedisServer {
        Self::start_args(password, port, &[]).await
    }

    /// With extra `redis-server` arguments (e.g. an ACL user).
    pub async fn start_args(
        password: Option<&str>,
        port: Option<u16>,
        extra: &[&str],
    ) -> RedisServer {
        let port = port.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        cmd.args(extra);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): sudo apt-get install -y redis-server")
        });
        let server = RedisServer {
            port,
            child: Some(child),
            password: password.map(str::to_string),
            tls_ca: None,
            _dir: dir,
        };
        for _ in 0..200 {
            if server.ping().await {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on port {port}");
    }

    /// Over TLS only (no plain port), with a certificate for 127.0.0.1 signed by `ca_pem`.
    pub async fn start_tls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        for (name, pem) in [
            ("ca.pem", ca_pem),
            ("cert.pem", cert_pem),
            ("key.pem", key_pem),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(dir.path().join("cert.pem"))
            .arg("--tls-key-file")
            .arg(dir.path().join("key.pem"))
            .arg("--tls-ca-cert-file")
            .arg(dir.path().join("ca.pem"))
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let server = RedisServer {
            port,
            child: Some(child),
            password: None,
            tls_ca: Some(ca_pem.to_string()),
            _dir: dir,
        };
        for _ in 0..200 {
            if server.ping().await {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server (TLS) did not answer on port {port}");
    }

    /// A gateway's `[shared]` block for this server, sealing with `keys`.
    pub fn shared_config(&self, keys: &std::path::Path) -> String {
        format!(
            "[shared]\nurl = \"{}\"\nencryption_key_file = \"{}\"\ntimeout = \"200ms\"\n",
            self.url(),
            keys.display()
        )
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    fn open(&self, info: redis::ConnectionInfo) -> redis::RedisResult<redis::Client> {
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.as_bytes().to_vec()),
                },
            ),
            None => redis::Client::open(info),
        }
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(self.url().as_str()).unwrap();
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p.as_str());
            info = info.set_redis_settings(settings);
        }
        self.open(info)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn ping(&self) -> bool {
        let Ok(mut info) = redis::IntoConnectionInfo::into_connection_info(self.url().as_str())
        else {
            return false;
        };
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p.as_str());
            info = info.set_redis_settings(settings);
        }
        let Ok(client) = self.open(info) else {
            return false;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// Kills it (SIGKILL, by PID) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
