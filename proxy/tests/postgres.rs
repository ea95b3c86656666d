//! Tollgate's own connections to Postgres, against the real server at
//! `DATABASE_URL` (default 127.0.0.1:5432): TLS as `sslmode` asks, through
//! the same code the pool, `migrate` and the start-up check use, and the
//! read-only role that `sql/V7__grafana_reader.sql` makes for Grafana.
//!
//! The TLS tests read the server's own certificate (`ssl_cert_file`; on
//! Debian the snakeoil certificate, self-signed, for the name it was made
//! for) and use it as `sslrootcert`, connecting to the server's address with
//! `hostaddr` while `host` carries the certificate's name, so the name need
//! not resolve. A server with `ssl = off`, or whose certificate this process
//! cannot read, cannot show any of that: those tests then say why and pass.
//! Whether a connection is encrypted is asked of the server (`pg_stat_ssl`).

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::SecretString;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tollgate::config::DatabaseConfig;
use tollgate::db;
use tollgate_testkit::TestDb;
use tollgate_testkit::db::{admin_statement_on_drop, admin_url, unique};

/// A CA certificate whose key was thrown away: it signed no server's
/// certificate, so `verify-*` against it must fail.
const UNRELATED_CA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/unrelated-ca.pem"
);
/// A name no certificate of the test server carries.
const WRONG_NAME: &str = "not-the-database.invalid";
/// Upper bound for a condition the race test waits on.
const POLL_DEADLINE: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

async fn connect_plain(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// `database.url` as the config would hold it; pool limits do not matter here.
fn database(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: SecretString::from(url),
        max_open_conns: 2,
        max_idle_conns: 1,
        max_lifetime: Duration::from_secs(60),
        max_idle_time: Duration::from_secs(30),
    }
}

/// Whether the server sees this session encrypted.
async fn encrypted(client: &Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The server at `DATABASE_URL`, as URLs to it are written.
struct Server {
    /// `user[:password]@`
    credentials: String,
    host: String,
    address: IpAddr,
    port: u16,
    dbname: String,
}

impl Server {
    fn from_env() -> Option<Self> {
        let url = admin_url();
        let config: tokio_postgres::Config = url.parse().unwrap();
        let tokio_postgres::config::Host::Tcp(host) = config.get_hosts().first()?.clone() else {
            eprintln!("skipped: DATABASE_URL names a Unix socket, and Postgres has no TLS there");
            return None;
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let address = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addresses| addresses.next())
            .unwrap_or_else(|| panic!("DATABASE_URL's host {host} does not resolve"))
            .ip();
        let encode = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let mut credentials = encode(config.get_user().unwrap_or("postgres"));
        if let Some(password) = config.get_password() {
            credentials = format!(
                "{credentials}:{}",
                encode(&String::from_utf8_lossy(password))
            );
        }
        Some(Self {
            credentials: format!("{credentials}@"),
            host,
            address,
            port,
            dbname: config.get_dbname().unwrap_or("postgres").to_owned(),
        })
    }

    /// A URL to `dbname` on this server: `host` is the name TLS checks,
    /// `hostaddr` where the connection goes; `query` is appended as written.
    fn url(&self, host: &str, dbname: &str, query: &str) -> String {
        format!(
            "postgres://{}{host}:{}/{dbname}?hostaddr={}&{query}",
            self.credentials, self.port, self.address
        )
    }

    fn admin(&self, query: &str) -> String {
        self.url(&self.host, &self.dbname, query)
    }
}

/// A server with TLS on, its certificate's file and a DNS name it is issued for.
struct TlsServer {
    server: Server,
    certificate: PathBuf,
    name: String,
}

impl TlsServer {
    /// `None`, with the reason printed, when the server cannot show TLS.
    async fn find() -> Option<Self> {
        let server = Server::from_env()?;
        let admin = connect_plain(&server.admin("sslmode=disable")).await;
        let show = |name: &'static str| {
            let admin = &admin;
            async move {
                admin
                    .query_one(&format!("SHOW {name}"), &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0)
            }
        };
        if show("ssl").await != "on" {
            eprintln!("skipped: the Postgres at DATABASE_URL has ssl = off");
            return None;
        }
        let mut certificate = PathBuf::from(show("ssl_cert_file").await);
        if certificate.is_relative() {
            certificate = Path::new(&show("data_directory").await).join(certificate);
        }
        let pem = match std::fs::read(&certificate) {
            Ok(pem) => pem,
            Err(e) => {
                eprintln!(
                    "skipped: cannot read the server's certificate {} ({e}): is DATABASE_URL a server on this machine?",
                    certificate.display()
                );
                return None;
            }
        };
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let parsed = webpki::EndEntityCert::try_from(&der).unwrap();
        let Some(name) = parsed
            .valid_dns_names()
            .find(|name| !name.starts_with('*'))
            .map(str::to_owned)
        else {
            eprintln!(
                "skipped: the server's certificate {} names no DNS name (subjectAltName) to check",
                certificate.display()
            );
            return None;
        };
        Some(Self {
            server,
            certificate,
            name,
        })
    }

    /// `sslmode` with `sslrootcert`, to the server under `host`.
    fn url(&self, mode: &str, host: &str, root: &Path) -> String {
        let root = utf8_percent_encode(&root.display().to_string(), NON_ALPHANUMERIC).to_string();
        self.server.url(
            host,
            &self.server.dbname,
            &format!("sslmode={mode}&sslrootcert={root}"),
        )
    }
}

/// An error and its causes, as a log line shows them with `{:#}`:
/// tokio-postgres keeps the reason a handshake failed in the chain.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text = format!("{text}: {e}");
        cause = e.source();
    }
    text
}

// ------------------------------------------------------------------ TLS

#[tokio::test]
async fn sslmode_require_encrypts_single_and_pooled_connections() {
    let Some(tls) = TlsServer::find().await else {
        return;
    };
    let config = database(&tls.server.admin("sslmode=require"));
    let (client, _driver) = db::connect(&config).await.unwrap();
    assert!(encrypted(&client).await, "db::connect (migrate, start-up)");
    let pool = db::pool(&config).unwrap();
    let pooled = pool.get().await.unwrap();
    assert!(encrypted(&pooled).await, "db::pool (the gateway)");
}

#[tokio::test]
async fn sslmode_disable_stays_plain_and_prefer_takes_what_the_server_offers() {
    let Some(server) = Server::from_env() else {
        return;
    };
    let (client, _driver) = db::connect(&database(&server.admin("sslmode=disable")))
        .await
        .unwrap();
    assert!(!encrypted(&client).await);
    let pooled = db::pool(&database(&server.admin("sslmode=disable")))
        .unwrap()
        .get()
        .await
        .unwrap();
    assert!(!encrypted(&pooled).await);

    let offered = client
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        == "on";
    for url in [server.admin("sslmode=prefer"), server.admin("")] {
        let (client, _driver) = db::connect(&database(&url)).await.unwrap();
        assert_eq!(encrypted(&client).await, offered, "{url}");
    }
}

#[tokio::test]
async fn sslmode_verify_full_accepts_the_servers_certificate_under_its_name() {
    let Some(tls) = TlsServer::find().await else {
        return;
    };
    let config = database(&tls.url("verify-full", &tls.name, &tls.certificate));
    let (client, _driver) = db::connect(&config)
        .await
        .unwrap_or_else(|e| panic!("verify-full as {}: {e:#}", tls.name));
    assert!(encrypted(&client).await);
    let pooled = db::pool(&config).unwrap().get().await.unwrap();
    assert!(encrypted(&pooled).await);
}

#[tokio::test]
async fn sslmode_verify_full_refuses_a_certificate_from_another_ca_saying_why() {
    let Some(tls) = TlsServer::find().await else {
        return;
    };
    let unrelated = Path::new(UNRELATED_CA);
    for mode in ["verify-full", "verify-ca", "require"] {
        let config = database(&tls.url(mode, &tls.name, unrelated));
        let error = format!("{:#}", db::connect(&config).await.err().unwrap());
        for expected in [
            "invalid peer certificate: UnknownIssuer".to_owned(),
            format!(
                "sslmode={mode}: the server's certificate must be signed by a CA in sslrootcert {UNRELATED_CA}"
            ),
        ] {
            assert!(
                error.contains(&expected),
                "{mode}: `{expected}` not in: {error}"
            );
        }
        let error = db::pool(&config).unwrap().get().await.err().unwrap();
        let error = chain(&error);
        assert!(error.contains("UnknownIssuer"), "{mode}, pooled: {error}");
    }
}

#[tokio::test]
async fn sslmode_verify_full_checks_the_name_and_verify_ca_does_not() {
    let Some(tls) = TlsServer::find().await else {
        return;
    };
    let config = database(&tls.url("verify-full", WRONG_NAME, &tls.certificate));
    let error = format!("{:#}", db::connect(&config).await.err().unwrap());
    assert!(
        error.contains(&format!("certificate not valid for name \"{WRONG_NAME}\"")),
        "{error}"
    );
    let config = database(&tls.url("verify-ca", WRONG_NAME, &tls.certificate));
    let (client, _driver) = db::connect(&config).await.unwrap();
    assert!(encrypted(&client).await);
}

/// The binary end to end: `tollgate migrate` against a fresh database with
/// `verify-full`, then refused with a CA that signed nothing.
#[tokio::test]
async fn tollgate_migrate_connects_with_verify_full_and_refuses_the_wrong_ca() {
    let Some(tls) = TlsServer::find().await else {
        return;
    };
    let db = TestDb::empty().await;
    let migrate = |root: &Path| {
        let url = tls.server.url(
            &tls.name,
            &db.name,
            &format!(
                "sslmode=verify-full&sslrootcert={}",
                utf8_percent_encode(&root.display().to_string(), NON_ALPHANUMERIC)
            ),
        );
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../config/tollgate.example.toml"
            ))
            .arg("migrate")
            .env("DATABASE_URL", url)
            .env_remove("GRAFANA_DB_PASSWORD")
            .output()
            .unwrap()
    };
    let output = migrate(&tls.certificate);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("applied V1__"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = migrate(Path::new(UNRELATED_CA));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("UnknownIssuer") && stderr.contains(UNRELATED_CA),
        "{stderr}"
    );
}

// ------------------------------------------------------------------ the Grafana role

#[tokio::test]
async fn grafana_role_reads_no_raw_usage_and_no_secrets_and_writes_nothing() {
    let db = TestDb::migrated().await;
    let client = connect_plain(&db.url).await;
    let role = db::GRAFANA_ROLE;
    let attributes = client
        .query_one(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication, rolinherit
             FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    for (i, attribute) in [
        "superuser",
        "createrole",
        "createdb",
        "bypassrls",
        "replication",
        "inherit",
    ]
    .iter()
    .enumerate()
    {
        assert!(!attributes.get::<_, bool>(i), "{role} has {attribute}");
    }
    // Privileges are checked as if the role had logged in; no password needed.
    client
        .batch_execute(&format!("SET ROLE {role}"))
        .await
        .unwrap();
    client
        .query("SELECT id, name, tier, status FROM accounts", &[])
        .await
        .expect("the dashboards' columns of accounts are readable");
    let refused = [
        "SELECT * FROM usage_events",
        "SELECT count(*) FROM usage_events",
        "SELECT hash FROM api_keys",
        "SELECT display_prefix FROM api_keys",
        "SELECT * FROM api_keys",
        "SELECT stripe_customer_id FROM billing_customers",
        "SELECT stripe_customer_id FROM billing_subscriptions",
        "SELECT identifier, last_error FROM billing_usage_exports",
        "SELECT * FROM billing_webhook_events",
        "SELECT * FROM usage_partitions",
        "INSERT INTO usage_rollup_minute (bucket, account_id, key_id, model, tier)
             VALUES (now(), gen_random_uuid(), gen_random_uuid(), 'm', 'free')",
        "UPDATE accounts SET tier = 'enterprise'",
        "DELETE FROM instance_events",
        "TRUNCATE usage_rollup_day",
        "CREATE TABLE grafana_scratch (x int)",
        // Executable by everyone, but it creates a partition of usage_events,
        // which only the table's owner may.
        "SELECT usage_ensure_partition(now())",
    ];
    let mut allowed = Vec::new();
    for statement in refused {
        match client.batch_execute(statement).await {
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
            other => allowed.push(format!("{statement}: {other:?}")),
        }
    }
    assert!(
        allowed.is_empty(),
        "{role} was not refused:\n  {}",
        allowed.join("\n  ")
    );
}

/// Roles are shared by every database on a server, so two databases
/// migrating at once both create the role: the second one's CREATE ROLE
/// waits for the first to commit and then finds the name taken. V7 must
/// treat that as done, not fail. Reproduced in a fixed order with a role of
/// the test's own, so the real one's existence does not hide the race.
#[tokio::test]
async fn grafana_role_migration_survives_a_concurrent_creation_in_another_database() {
    let role = unique("tollgate_grafana_race");
    let cleanup = RoleCleanup(role.clone());
    let (first, second) = (TestDb::migrated().await, TestDb::migrated().await);
    let v7 = include_str!("../../sql/V7__grafana_reader.sql").replace("tollgate_grafana", &role);

    let creator = connect_plain(&first.url).await;
    creator.batch_execute("BEGIN").await.unwrap();
    creator.batch_execute(&v7).await.unwrap();

    let racer = connect_plain(&second.url).await;
    let racer_pid: i32 = racer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let raced = tokio::spawn({
        let v7 = v7.clone();
        async move { racer.batch_execute(&v7).await.map(|()| racer) }
    });
    let admin = connect_plain(&admin_url()).await;
    let deadline = tokio::time::Instant::now() + POLL_DEADLINE;
    loop {
        let waiting: Option<String> = admin
            .query_opt(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                &[&racer_pid],
            )
            .await
            .unwrap()
            .and_then(|row| row.get(0));
        if waiting.as_deref() == Some("Lock") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second migration never waited for the first's role"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    creator.batch_execute("COMMIT").await.unwrap();
    let racer = raced
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the second database's V7 failed: {e:?}"));

    for client in [&creator, &racer] {
        let granted: bool = client
            .query_one(
                "SELECT has_table_privilege($1, 'usage_rollup_minute', 'SELECT')",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        assert!(granted, "each database grants the role its own tables");
    }
    drop((creator, racer, first, second));
    drop(cleanup);
}

/// Drops a role of the test's own once its databases (and grants) are gone.
struct RoleCleanup(String);

impl Drop for RoleCleanup {
    fn drop(&mut self) {
        admin_statement_on_drop(format!("DROP ROLE IF EXISTS {}", self.0));
    }
}
