//! `tollgate`: the gateway binary. The logic lives in the library modules;
//! this file reads the command line and dispatches.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Parser;
use secrecy::ExposeSecret;
use tollgate::billing::{CheckoutRequest, PortalRequest};
use tollgate::cli::{
    BillingCommand, Cli, Command, FleetCommand, KeysCommand, MigrateArgs, UsageCommand,
};
use tollgate::config::{Config, ProcessEnv, parse_duration};
use tollgate::keys::store::{KeyListing, KeyStore};
use tollgate::keys::{KeyAdmin, NewKeyRequest};
use tollgate::usage_api::{self, UsageQuery};
use tollgate::{billing, db, server};
use tollgate_billing::reconcile::Day;

// The process's allocator: jemalloc by default (see proxy/Cargo.toml's
// features and BENCHMARKS.md, "Memory"); glibc malloc without features.
#[cfg(all(feature = "jemalloc", feature = "mimalloc"))]
compile_error!("features `jemalloc` and `mimalloc` each set the global allocator: enable one");
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long `fleet status` waits for the gateway's admin API.
const FLEET_STATUS_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The audio probe's child: no config, no logs, only the demuxers.
    if let Command::ProbeAudio = cli.command {
        return tollgate::gateway::audio_probe::run_child();
    }
    let default_level = match cli.command {
        Command::Serve => "info",
        _ => "warn",
    };
    if let Err(e) = tollgate_backends::logs::init(default_level) {
        eprintln!("tollgate: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref(), &ProcessEnv)?;
    match cli.command {
        // `serve` runs Pingora's own runtimes; the other commands need a small one.
        Command::Serve => {
            block_on(check_account_tiers(&config))?;
            server::serve(config)
        }
        Command::Migrate(args) => block_on(migrate(&config, args)),
        Command::Keys(command) => block_on(keys(&config, command)),
        Command::Usage(command) => block_on(usage(&config, command)),
        Command::Billing(BillingCommand::Export) => block_on(billing_export(&config)),
        Command::Billing(BillingCommand::SyncCatalog) => block_on(billing_sync_catalog(&config)),
        Command::Billing(BillingCommand::Reconcile { from, to }) => {
            block_on(billing_reconcile(&config, from, to))
        }
        Command::Billing(BillingCommand::Checkout {
            account,
            tier,
            success_url,
            cancel_url,
        }) => block_on(billing_session(
            &config,
            &account,
            BillingSession::Checkout(CheckoutRequest {
                tier,
                success_url,
                cancel_url,
            }),
        )),
        Command::Billing(BillingCommand::Portal {
            account,
            return_url,
        }) => block_on(billing_session(
            &config,
            &account,
            BillingSession::Portal(PortalRequest { return_url }),
        )),
        Command::Fleet(FleetCommand::Status) => block_on(fleet_status(&config)),
        Command::Fleet(FleetCommand::Drain { name }) => {
            block_on(fleet_command(&config, &name, "drain"))
        }
        Command::Fleet(FleetCommand::Sleep { name }) => {
            block_on(fleet_command(&config, &name, "sleep"))
        }
        Command::Fleet(FleetCommand::Wake { name }) => {
            block_on(fleet_command(&config, &name, "wake"))
        }
        // Handled in `main`, before the config is read.
        Command::ProbeAudio => Ok(()),
    }
}

fn block_on(task: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(task)
}

/// Refuses to serve when an account is on a tier the config does not define:
/// its requests would have no limits to apply.
async fn check_account_tiers(config: &Config) -> anyhow::Result<()> {
    let Some(tiers) = db::account_tiers(&config.database).await? else {
        tracing::warn!("Postgres unreachable at start-up: account tiers not checked");
        return Ok(());
    };
    let unknown: Vec<_> = tiers
        .iter()
        .filter(|t| !config.tiers.iter().any(|c| &c.name == *t))
        .map(String::as_str)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "accounts are on tiers the config does not define: {}; add [[tiers]] entries \
             for them or move the accounts to a defined tier",
            unknown.join(", ")
        )
    }
}

/// Calls the running gateway's admin API (`method path`, no body) and
/// returns its JSON answer.
async fn admin_call(
    config: &Config,
    method: http::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let token = config.admin_token.as_ref().ok_or_else(|| {
        anyhow::anyhow!("admin.token (env TOLLGATE_ADMIN_TOKEN) is needed to ask the gateway")
    })?;
    let url = format!("http://{}{path}", config.server.admin_listen);
    let request = http::Request::builder()
        .method(method)
        .uri(&url)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.expose_secret()),
        )
        .body(Empty::<bytes::Bytes>::new())?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(FLEET_STATUS_TIMEOUT, client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{url} did not answer"))?
        .map_err(|e| anyhow::anyhow!("{url}: {e} (is `tollgate serve` running?)"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

/// `tollgate fleet status`: asks the running gateway's admin API.
async fn fleet_status(config: &Config) -> anyhow::Result<()> {
    let listing = admin_call(config, http::Method::GET, "/admin/backends").await?;
    println!(
        "{:<16} {:<8} {:<12} {:<24} {:<9} {:<8} {:<10} {:>9} {:>6} {:>9}  MODELS",
        "NAME",
        "PROVIDER",
        "STATE",
        "ADDRESS",
        "ROUTABLE",
        "HEALTHY",
        "BREAKER",
        "IN_FLIGHT",
        "SLOTS",
        "COST"
    );
    for b in listing["data"].as_array().into_iter().flatten() {
        let models: Vec<&str> = b["models"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m.as_str())
            .collect();
        let yes_no = |v: &serde_json::Value| if *v == true { "yes" } else { "no" };
        let address = b["address"]
            .as_str()
            .filter(|a| !a.is_empty())
            .unwrap_or("-");
        println!(
            "{:<16} {:<8} {:<12} {:<24} {:<9} {:<8} {:<10} {:>9} {:>6} {:>9.2}  {}",
            b["name"].as_str().unwrap_or("-"),
            b["provider"].as_str().unwrap_or("-"),
            b["state"].as_str().unwrap_or("-"),
            address,
            yes_no(&b["routable"]),
            yes_no(&b["healthy"]),
            b["breaker"].as_str().unwrap_or("-"),
            b["in_flight"],
            b["max_concurrency"],
            b["cost_so_far"].as_f64().unwrap_or(0.0),
            models.join(",")
        );
    }
    Ok(())
}

/// `tollgate fleet drain|sleep|wake NAME`.
async fn fleet_command(config: &Config, name: &str, verb: &str) -> anyhow::Result<()> {
    let answer = admin_call(
        config,
        http::Method::POST,
        &format!("/admin/backends/{name}/{verb}"),
    )
    .await?;
    println!(
        "{name}: {verb} accepted; state now {}",
        answer["state"].as_str().unwrap_or("-")
    );
    Ok(())
}

/// `tollgate billing export`.
async fn billing_export(config: &Config) -> anyhow::Result<()> {
    let stripe = config.billing.stripe.as_ref().ok_or_else(|| {
        anyhow::anyhow!("STRIPE_SECRET_KEY is not set: there is no Stripe to export to")
    })?;
    let pool = db::pool(&config.database)?;
    let report = billing::export_now(&pool, &config.billing, stripe).await?;
    println!(
        "planned {} meter events; sent {}, already at Stripe {}, left for a retry {}, rejected {}, expired {}",
        report.planned,
        report.sent,
        report.duplicates,
        report.retry_later,
        report.rejected,
        report.expired
    );
    Ok(())
}

/// `tollgate billing sync-catalog`.
async fn billing_sync_catalog(config: &Config) -> anyhow::Result<()> {
    let stripe = config.billing.stripe.as_ref().ok_or_else(|| {
        anyhow::anyhow!("STRIPE_SECRET_KEY is not set: there is no Stripe to sync to")
    })?;
    let report = billing::sync_catalog_now(config, stripe).await?;
    print!("{report}");
    Ok(())
}

/// `tollgate billing reconcile`.
async fn billing_reconcile(config: &Config, from: Day, to: Day) -> anyhow::Result<()> {
    let pool = db::pool(&config.database)?;
    let reports = billing::reconcile_now(&pool, config, from, to).await?;
    let mut differences = 0;
    for (meter, report) in &reports {
        if reports.len() > 1 {
            println!("meter {meter}:");
        }
        print!("{report}");
        differences += report.differences().count();
    }
    anyhow::ensure!(
        differences == 0,
        "{differences} customer-days differ between the usage log, the exports and Stripe"
    );
    Ok(())
}

enum BillingSession {
    Checkout(CheckoutRequest),
    Portal(PortalRequest),
}

/// `tollgate billing checkout|portal`: prints the session's URL.
async fn billing_session(
    config: &Config,
    account: &str,
    request: BillingSession,
) -> anyhow::Result<()> {
    let pool = db::pool(&config.database)?;
    let sessions = billing::BillingSessions::from_config(config, pool)?
        .ok_or_else(|| anyhow::anyhow!("STRIPE_SECRET_KEY is not set: billing is off"))?;
    let account_id = sessions.account_id(account).await?;
    let session = match request {
        BillingSession::Checkout(request) => sessions.checkout(account_id, request).await?,
        BillingSession::Portal(request) => sessions.portal(account_id, request).await?,
    };
    println!("{}", session["url"].as_str().unwrap_or_default());
    Ok(())
}

async fn migrate(config: &Config, args: MigrateArgs) -> anyhow::Result<()> {
    let applied = db::migrate(&config.database).await?;
    if applied.is_empty() {
        println!("database is up to date");
    }
    for migration in applied {
        println!("applied {migration}");
    }
    // An empty GRAFANA_DB_PASSWORD counts as unset, as every other variable.
    if let Some(password) = args.grafana_password.filter(|p| !p.is_empty()) {
        db::allow_grafana_login(&config.database, &password).await?;
        println!(
            "role {} can log in with the given password",
            db::GRAFANA_ROLE
        );
    }
    Ok(())
}

async fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let store = KeyStore::new(db::pool(&config.database)?);
    let admin = KeyAdmin::new(store, config, None);
    match command {
        KeysCommand::Create(create) => {
            let expires_in = create
                .expires
                .as_deref()
                .map(|d| {
                    parse_duration(d).ok_or_else(|| {
                        anyhow::anyhow!("--expires {d:?} is not a duration like 30d")
                    })
                })
                .transpose()?;
            let created = admin
                .create_key(NewKeyRequest {
                    account: create.account,
                    tier: create.tier,
                    name: create.name,
                    expires_in,
                    models: create.models,
                })
                .await?;
            let key = &created.listing;
            println!(
                "created key {} ({}) for account {} on tier {}",
                key.id, key.prefix, key.account, key.tier
            );
            println!("store it now: it is shown only once");
            println!("{}", created.secret);
        }
        KeysCommand::List { account } => {
            let keys = admin.list_keys(account.as_deref()).await?;
            println!(
                "{:<36}  {:<11}  {:<20}  {:<12}  {:<8}  {:<20}  NAME",
                "ID", "PREFIX", "ACCOUNT", "TIER", "STATUS", "MODELS"
            );
            for key in keys {
                println!(
                    "{:<36}  {:<11}  {:<20}  {:<12}  {:<8}  {:<20}  {}",
                    key.id,
                    key.prefix,
                    key.account,
                    key.tier,
                    status(&key),
                    key.models
                        .as_ref()
                        .map_or("all".to_owned(), |m| m.join(",")),
                    key.name.as_deref().unwrap_or("")
                );
            }
        }
        KeysCommand::Revoke { key } => {
            let revoked = admin.revoke_key(&key).await?;
            println!(
                "revoked key {} ({}) of account {}",
                revoked.id, revoked.prefix, revoked.account
            );
        }
    }
    Ok(())
}

async fn usage(config: &Config, command: UsageCommand) -> anyhow::Result<()> {
    let pool = db::pool(&config.database)?;
    let output = match command {
        UsageCommand::Report {
            account,
            from,
            to,
            group_by,
        } => {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(account.iter().map(|a| ("account", a.as_str())))
                .extend_pairs(from.iter().map(|f| ("from", f.as_str())))
                .extend_pairs(to.iter().map(|t| ("to", t.as_str())))
                .append_pair("group_by", &group_by)
                .finish();
            let query = UsageQuery::parse(Some(&query)).map_err(|e| anyhow::anyhow!("{e}"))?;
            usage_api::totals(&pool, None, &query)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
        }
        UsageCommand::Purge { before } => {
            let before =
                usage_api::parse_time(&before, "before").map_err(|e| anyhow::anyhow!("--{e}"))?;
            let purged = usage_api::purge(&pool, before)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            serde_json::to_value(purged)?
        }
    };
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}

fn status(key: &KeyListing) -> &'static str {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if key.revoked_at.is_some() {
        "revoked"
    } else if key.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    }
}
