//! Catalog sync against the stateful fake Stripe: one meter, one product
//! per paid tier and one active price per lookup key, however often it runs
//! and wherever a run stopped; a second run only reads.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use stripe::{Client, StripeError};
use stripe_billing::BillingMeter;
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterDefaultAggregation,
    CreateBillingMeterDefaultAggregationFormula, ListBillingMeter,
};
use stripe_product::price::{ListPrice, RetrievePrice};
use stripe_product::product::{ListProduct, RetrieveProduct, UpdateProduct};
use stripe_shared::{Price, PriceBillingScheme, PriceTiersMode, Product};
use tollgate_billing::catalog::{
    Catalog, CatalogTier, ObjectKind, Outcome, Overage, SyncReport, UnitOverage, sync_catalog,
};
use tollgate_billing::stripe_api::client;
use tollgate_testkit::stripe::{FakeStripe, Fault, RecordedRequest, Route};

const METER: &str = "tollgate_units";

/// A free tier, a tier without overage and two with it.
fn catalog() -> Catalog {
    let tier = |name: &str, cents: i64, included: u64, overage: Option<f64>| CatalogTier {
        name: name.to_owned(),
        price_lookup_key: format!("{name}_monthly"),
        monthly_price_cents: cents,
        included_units: included,
        overage: overage.map(|usd| Overage {
            lookup_key: format!("{name}_overage"),
            usd_per_unit: usd,
        }),
        unit_overages: Vec::new(),
    };
    Catalog {
        meter_event_name: METER.to_owned(),
        currency: "usd".to_owned(),
        tiers: vec![
            tier("free", 0, 100_000, None),
            tier("starter", 900, 1_000_000, None),
            tier("pro", 2900, 10_000_000, Some(0.000002)),
            tier("team", 9900, 50_000_000, Some(0.0000015)),
        ],
    }
}

const LOOKUP_KEYS: [&str; 5] = [
    "starter_monthly",
    "pro_monthly",
    "pro_overage",
    "team_monthly",
    "team_overage",
];
const PRODUCTS: [&str; 3] = [
    "tollgate_tier_starter",
    "tollgate_tier_pro",
    "tollgate_tier_team",
];

async fn start() -> (FakeStripe, Client) {
    let fake = FakeStripe::start().await.unwrap();
    let client = client(fake.secret_key(), Some(fake.base_url())).unwrap();
    (fake, client)
}

/// Everything the fake holds, read back through `async-stripe`.
struct Holdings {
    meters: Vec<BillingMeter>,
    products: Vec<Product>,
    /// Active and archived.
    prices: Vec<Price>,
}

impl Holdings {
    async fn read(client: &Client) -> Self {
        let meters = ListBillingMeter::new()
            .limit(100)
            .send(client)
            .await
            .unwrap();
        let products = ListProduct::new().limit(100).send(client).await.unwrap();
        let prices = ListPrice::new().limit(100).send(client).await.unwrap();
        assert!(!meters.has_more && !products.has_more && !prices.has_more);
        Self {
            meters: meters.data,
            products: products.data,
            prices: prices.data,
        }
    }

    fn active_with_key(&self, key: &str) -> Vec<&Price> {
        self.prices
            .iter()
            .filter(|p| p.active && p.lookup_key.as_deref() == Some(key))
            .collect()
    }

    /// Exactly one meter, one product per paid tier and one active price
    /// per lookup key, and no other active price.
    fn assert_one_set(&self) {
        assert_eq!(self.meters.len(), 1, "{:?}", self.meters);
        assert_eq!(self.meters[0].event_name, METER);
        let mut products: Vec<&str> = self.products.iter().map(|p| p.id.as_str()).collect();
        products.sort_unstable();
        let mut expected = PRODUCTS.to_vec();
        expected.sort_unstable();
        assert_eq!(products, expected);
        for key in LOOKUP_KEYS {
            assert_eq!(self.active_with_key(key).len(), 1, "lookup key {key}");
        }
        let active = self.prices.iter().filter(|p| p.active).count();
        assert_eq!(active, LOOKUP_KEYS.len());
    }
}

fn posts(requests: &[RecordedRequest]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path.clone())
        .collect()
}

/// The requests a run sent, and its report.
async fn run(fake: &FakeStripe, client: &Client, catalog: &Catalog) -> (SyncReport, Vec<String>) {
    let before = fake.requests().len();
    let report = sync_catalog(client, catalog).await.unwrap();
    (report, posts(&fake.requests()[before..]))
}

fn assert_all_unchanged(report: &SyncReport) {
    assert!(!report.changed(), "{report}");
    assert_eq!(report.actions.len(), 1 + PRODUCTS.len() + LOOKUP_KEYS.len());
}

#[tokio::test]
async fn syncing_twice_creates_one_set_and_the_second_run_only_reads() {
    let (fake, client) = start().await;

    let (first, _) = run(&fake, &client, &catalog()).await;
    assert!(
        first.actions.iter().all(|a| a.outcome == Outcome::Created),
        "{first}"
    );
    let holdings = Holdings::read(&client).await;
    holdings.assert_one_set();
    let meter = &holdings.meters[0];
    assert_eq!(meter.default_aggregation.formula.as_str(), "sum");
    assert_eq!(
        meter.customer_mapping.event_payload_key,
        "stripe_customer_id"
    );
    assert_eq!(meter.value_settings.event_payload_key, "value");

    let flat = holdings.active_with_key("pro_monthly")[0];
    assert_eq!(flat.unit_amount, Some(2900));
    assert_eq!(flat.currency.to_string(), "usd");
    assert_eq!(flat.product.id().as_str(), "tollgate_tier_pro");
    let recurring = flat.recurring.as_ref().unwrap();
    assert_eq!(recurring.interval.as_str(), "month");
    assert_eq!(recurring.usage_type.as_str(), "licensed");
    assert_eq!(recurring.meter, None);

    let overage_id = holdings.active_with_key("pro_overage")[0].id.clone();
    let overage = RetrievePrice::new(overage_id)
        .expand(vec!["tiers".to_owned()])
        .send(&client)
        .await
        .unwrap();
    let recurring = overage.recurring.as_ref().unwrap();
    assert_eq!(recurring.usage_type.as_str(), "metered");
    assert_eq!(recurring.meter.as_deref(), Some(meter.id.as_str()));
    assert_eq!(overage.billing_scheme, PriceBillingScheme::Tiered);
    assert_eq!(overage.tiers_mode, Some(PriceTiersMode::Graduated));
    let tiers = overage.tiers.unwrap();
    assert_eq!(tiers.len(), 2);
    assert_eq!(tiers[0].up_to, Some(10_000_000));
    assert_eq!(tiers[0].unit_amount_decimal.as_deref(), Some("0"));
    assert_eq!(tiers[1].up_to, None);
    assert_eq!(tiers[1].unit_amount_decimal.as_deref(), Some("0.0002"));

    let text = first.to_string();
    assert_eq!(text.lines().count(), first.actions.len());
    assert!(
        text.lines().any(|l| l.starts_with("created price price_")
            && l.ends_with("(lookup key pro_monthly): 2900 usd/month")),
        "{text}"
    );

    let (second, posts) = run(&fake, &client, &catalog()).await;
    assert_all_unchanged(&second);
    assert_eq!(posts, Vec::<String>::new());
    // The same objects, by id.
    let ids = |r: &SyncReport| r.actions.iter().map(|a| a.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&second));
    Holdings::read(&client).await.assert_one_set();
}

#[tokio::test]
async fn a_changed_overage_price_replaces_the_price_and_archives_the_old_one() {
    let (fake, client) = start().await;
    run(&fake, &client, &catalog()).await;
    let old = Holdings::read(&client).await.active_with_key("pro_overage")[0]
        .id
        .to_string();

    let mut changed = catalog();
    changed.tiers[2].overage.as_mut().unwrap().usd_per_unit = 0.000003;
    let (report, posts) = run(&fake, &client, &changed).await;
    let updates: Vec<_> = report
        .actions
        .iter()
        .filter(|a| a.outcome != Outcome::Unchanged)
        .collect();
    assert_eq!(updates.len(), 1, "{report}");
    let update = updates[0];
    assert_eq!(
        (update.outcome, update.kind, update.key.as_str()),
        (Outcome::Updated, ObjectKind::Price, "pro_overage")
    );
    assert_ne!(update.id, old);
    assert!(update.detail.contains(&old), "{}", update.detail);
    assert!(update.detail.contains("0.0002 → "), "{}", update.detail);
    assert_eq!(
        posts,
        vec!["/v1/prices".to_owned(), format!("/v1/prices/{old}")]
    );

    let holdings = Holdings::read(&client).await;
    holdings.assert_one_set();
    let new = holdings.active_with_key("pro_overage")[0];
    assert_eq!(new.id.as_str(), update.id);
    let archived = holdings
        .prices
        .iter()
        .find(|p| p.id.as_str() == old)
        .unwrap();
    assert!(!archived.active);
    assert_eq!(archived.lookup_key, None);
    let new = RetrievePrice::new(update.id.clone())
        .expand(vec!["tiers".to_owned()])
        .send(&client)
        .await
        .unwrap();
    let tiers = new.tiers.unwrap();
    assert_eq!(tiers[1].unit_amount_decimal.as_deref(), Some("0.0003"));

    let (third, posts) = run(&fake, &client, &changed).await;
    assert_all_unchanged(&third);
    assert_eq!(posts, Vec::<String>::new());
}

#[tokio::test]
async fn a_free_tier_gets_no_product_and_no_price() {
    let (fake, client) = start().await;
    let (report, _) = run(&fake, &client, &catalog()).await;
    assert!(
        report.actions.iter().all(|a| !a.key.starts_with("free")),
        "{report}"
    );
    assert!(fake.requests().iter().all(|r| !r.path.contains("free")));
    let missing = RetrieveProduct::new("tollgate_tier_free")
        .send(&client)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StripeError::Stripe(_, 404)),
        "{missing:?}"
    );
    let holdings = Holdings::read(&client).await;
    holdings.assert_one_set();
    assert!(holdings.active_with_key("free_monthly").is_empty());
}

#[tokio::test]
async fn a_failed_price_creation_names_the_price_and_a_rerun_finishes_without_duplicates() {
    let (fake, client) = start().await;
    fake.fail_next(Route::post("/v1/prices"), 1, Fault::ServerError);

    let error = sync_catalog(&client, &catalog()).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("creating price with lookup key `starter_monthly`"),
        "{message}"
    );
    assert!(message.contains("500"), "{message}");

    let (rerun, _) = run(&fake, &client, &catalog()).await;
    let created: Vec<_> = rerun
        .actions
        .iter()
        .filter(|a| a.outcome == Outcome::Created)
        .map(|a| a.key.as_str())
        .collect();
    // The meter and the starter product were made before the failure.
    assert_eq!(
        created,
        [
            "starter_monthly",
            "pro",
            "pro_monthly",
            "pro_overage",
            "team",
            "team_monthly",
            "team_overage"
        ]
    );
    let holdings = Holdings::read(&client).await;
    holdings.assert_one_set();
    assert_eq!(holdings.prices.len(), LOOKUP_KEYS.len());

    let (third, posts) = run(&fake, &client, &catalog()).await;
    assert_all_unchanged(&third);
    assert_eq!(posts, Vec::<String>::new());
}

#[tokio::test]
async fn a_run_stopped_before_archiving_the_replaced_price_is_finished_by_the_next() {
    let (fake, client) = start().await;
    run(&fake, &client, &catalog()).await;
    let old = Holdings::read(&client)
        .await
        .active_with_key("team_overage")[0]
        .id
        .to_string();
    let mut changed = catalog();
    changed.tiers[3].overage.as_mut().unwrap().usd_per_unit = 0.000001;
    fake.fail_next(
        Route::post(&format!("/v1/prices/{old}")),
        1,
        Fault::ServerError,
    );

    let message = sync_catalog(&client, &changed)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!("archiving price {old}")),
        "{message}"
    );
    assert!(message.contains("team_overage"), "{message}");
    let holdings = Holdings::read(&client).await;
    let team_active = holdings
        .prices
        .iter()
        .filter(|p| p.active && p.product.id().as_str() == "tollgate_tier_team")
        .count();
    assert_eq!(
        team_active, 3,
        "old and new overage price, and the flat one"
    );

    let (rerun, posts) = run(&fake, &client, &changed).await;
    let changes: Vec<_> = rerun
        .actions
        .iter()
        .filter(|a| a.outcome != Outcome::Unchanged)
        .map(|a| (a.outcome, a.id.as_str(), a.key.as_str()))
        .collect();
    assert_eq!(
        changes,
        [(Outcome::Archived, old.as_str(), "team_overage")],
        "{rerun}"
    );
    assert_eq!(posts, [format!("/v1/prices/{old}")]);
    Holdings::read(&client).await.assert_one_set();

    let (last, posts) = run(&fake, &client, &changed).await;
    assert_all_unchanged(&last);
    assert_eq!(posts, Vec::<String>::new());
}

#[tokio::test]
async fn a_lost_answer_to_a_price_creation_is_replayed_not_applied_twice() {
    let (fake, client) = start().await;
    fake.fail_next(Route::post("/v1/prices"), 1, Fault::ResponseLost);

    let (report, _) = run(&fake, &client, &catalog()).await;
    assert!(
        report.actions.iter().all(|a| a.outcome == Outcome::Created),
        "{report}"
    );
    let holdings = Holdings::read(&client).await;
    holdings.assert_one_set();
    assert_eq!(holdings.prices.len(), LOOKUP_KEYS.len());

    let attempts: Vec<RecordedRequest> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/prices")
        .take(2)
        .collect();
    assert_eq!(attempts[0].status, None, "the answer was lost");
    assert_eq!(attempts[1].status, Some(200));
    let key = |r: &RecordedRequest| r.headers.get("idempotency-key").cloned();
    assert!(key(&attempts[0]).is_some());
    assert_eq!(key(&attempts[0]), key(&attempts[1]));
}

#[tokio::test]
async fn a_product_renamed_in_the_dashboard_gets_its_name_back() {
    let (fake, client) = start().await;
    run(&fake, &client, &catalog()).await;
    UpdateProduct::new("tollgate_tier_pro")
        .name("Pro (old name)")
        .send(&client)
        .await
        .unwrap();

    let (report, posts) = run(&fake, &client, &catalog()).await;
    let changes: Vec<_> = report
        .actions
        .iter()
        .filter(|a| a.outcome != Outcome::Unchanged)
        .collect();
    assert_eq!(changes.len(), 1, "{report}");
    assert_eq!(
        (changes[0].outcome, changes[0].kind, changes[0].id.as_str()),
        (Outcome::Updated, ObjectKind::Product, "tollgate_tier_pro")
    );
    assert!(
        changes[0].detail.contains("Pro (old name)"),
        "{}",
        changes[0].detail
    );
    assert_eq!(posts, ["/v1/products/tollgate_tier_pro"]);
    let product = RetrieveProduct::new("tollgate_tier_pro")
        .send(&client)
        .await
        .unwrap();
    assert_eq!(product.name, "Tollgate Pro");
}

#[tokio::test]
async fn a_meter_that_counts_instead_of_summing_stops_the_sync_before_anything_is_made() {
    let (fake, client) = start().await;
    let counting = CreateBillingMeter::new(
        CreateBillingMeterDefaultAggregation::new(
            CreateBillingMeterDefaultAggregationFormula::Count,
        ),
        "Requests",
        METER,
    )
    .send(&client)
    .await
    .unwrap();
    let before = fake.requests().len();

    let message = sync_catalog(&client, &catalog())
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains(counting.id.as_str()), "{message}");
    assert!(message.contains("`count`"), "{message}");
    assert_eq!(posts(&fake.requests()[before..]), Vec::<String>::new());
}

/// A tier selling images beyond its included ones gets a metered price on
/// an images meter of its own, beside the token meter; a second run reads.
#[tokio::test]
async fn an_image_overage_is_a_price_on_the_images_meter() {
    const IMAGES: &str = "tollgate_images";
    let (fake, client) = start().await;
    let mut catalog = catalog();
    catalog.tiers[1].unit_overages.push(UnitOverage {
        meter_event_name: IMAGES.to_owned(),
        included_units: 500,
        overage: Overage {
            lookup_key: "starter_images_overage".to_owned(),
            usd_per_unit: 0.025,
        },
    });
    let (first, _) = run(&fake, &client, &catalog).await;
    assert!(first.changed(), "{first}");
    let holdings = Holdings::read(&client).await;
    let mut meters: Vec<&str> = holdings
        .meters
        .iter()
        .map(|m| m.event_name.as_str())
        .collect();
    meters.sort_unstable();
    assert_eq!(meters, [IMAGES, METER]);
    let images_meter = holdings
        .meters
        .iter()
        .find(|m| m.event_name == IMAGES)
        .unwrap();
    let price = holdings.active_with_key("starter_images_overage")[0];
    let recurring = price.recurring.as_ref().unwrap();
    assert_eq!(recurring.usage_type.as_str(), "metered");
    assert_eq!(recurring.meter.as_deref(), Some(images_meter.id.as_str()));
    assert_eq!(
        price.product.id().as_str(),
        "tollgate_tier_starter",
        "{price:?}"
    );
    let (second, posts) = run(&fake, &client, &catalog).await;
    assert!(!second.changed(), "{second}");
    assert_eq!(posts, Vec::<String>::new());
}
