//! The test kit's fake Stripe (`tollgate_testkit::stripe`) against Stripe's documented
//! behaviour, through plain HTTP with form bodies as any client sends them:
//! the catalog a metered plan needs, meter events counted once, idempotent
//! replay, every fault kind, auth errors, Checkout and the portal, and event
//! summaries per hour. The last test reads every kind of answer with
//! `async-stripe`'s own types, so the fake cannot drift from what the real
//! client accepts.

#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking, and clippy.toml covers only #[test] fns"
)]

use std::time::Duration;

use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde_json::Value;
use tollgate_testkit::stripe::{FakeStripe, Fault, Outage, Route};

const METER_EVENT_NAME: &str = "tollgate_units";
const LOOKUP_KEY: &str = "tollgate_pro_units";

/// A minimal Stripe client: form bodies, Bearer auth, JSON answers.
struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

impl Api {
    fn new(fake: &FakeStripe) -> Self {
        Self::with_timeout(fake, Duration::from_secs(10))
    }

    fn with_timeout(fake: &FakeStripe, timeout: Duration) -> Self {
        Self {
            http: reqwest::Client::builder().timeout(timeout).build().unwrap(),
            base: fake.base_url().to_owned(),
            key: fake.secret_key().to_owned(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, &str)],
        idempotency_key: Option<&str>,
    ) -> Result<Answer, reqwest::Error> {
        let encoded = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let url = format!("{}{path}", self.base);
        let mut request = if method == Method::GET {
            self.http.get(format!("{url}?{encoded}"))
        } else {
            self.http
                .request(method, url)
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(encoded)
        };
        request = request.bearer_auth(&self.key);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn post(&self, path: &str, params: &[(&str, &str)]) -> Answer {
        self.send(Method::POST, path, params, None).await.unwrap()
    }

    async fn get(&self, path: &str, params: &[(&str, &str)]) -> Answer {
        self.send(Method::GET, path, params, None).await.unwrap()
    }

    async fn meter_event(
        &self,
        identifier: &str,
        customer: &str,
        value: &str,
        timestamp: i64,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, reqwest::Error> {
        let timestamp = timestamp.to_string();
        self.send(
            Method::POST,
            "/v1/billing/meter_events",
            &[
                ("event_name", METER_EVENT_NAME),
                ("payload[stripe_customer_id]", customer),
                ("payload[value]", value),
                ("identifier", identifier),
                ("timestamp", &timestamp),
            ],
            idempotency_key,
        )
        .await
    }
}

/// A meter, a product and a graduated metered price with a lookup key, as
/// Tollgate's catalog sync makes them.
struct Catalog {
    meter: String,
    product: String,
    price: String,
}

async fn catalog(api: &Api) -> Catalog {
    let meter = api
        .post(
            "/v1/billing/meters",
            &[
                ("display_name", "Tollgate units"),
                ("event_name", METER_EVENT_NAME),
                ("default_aggregation[formula]", "sum"),
                ("customer_mapping[event_payload_key]", "stripe_customer_id"),
                ("customer_mapping[type]", "by_id"),
                ("value_settings[event_payload_key]", "value"),
            ],
        )
        .await;
    assert_eq!(meter.status, 200, "{:?}", meter.body);
    let meter = meter.body["id"].as_str().unwrap().to_owned();
    let product = api.post("/v1/products", &[("name", "Tollgate Pro")]).await;
    assert_eq!(product.status, 200, "{:?}", product.body);
    let product = product.body["id"].as_str().unwrap().to_owned();
    let price = create_tiered_price(api, &product, &meter, &[]).await;
    assert_eq!(price.status, 200, "{:?}", price.body);
    Catalog {
        meter,
        product,
        price: price.body["id"].as_str().unwrap().to_owned(),
    }
}

async fn create_tiered_price(
    api: &Api,
    product: &str,
    meter: &str,
    extra: &[(&str, &str)],
) -> Answer {
    let mut params = vec![
        ("currency", "usd"),
        ("product", product),
        ("lookup_key", LOOKUP_KEY),
        ("billing_scheme", "tiered"),
        ("tiers_mode", "graduated"),
        ("tiers[0][up_to]", "1000000"),
        ("tiers[0][unit_amount_decimal]", "0"),
        ("tiers[1][up_to]", "inf"),
        ("tiers[1][unit_amount_decimal]", "0.0002"),
        ("recurring[interval]", "month"),
        ("recurring[usage_type]", "metered"),
        ("recurring[meter]", meter),
    ];
    params.extend_from_slice(extra);
    api.post("/v1/prices", &params).await
}

/// An hour start half a day back, on the fake's clock.
fn an_hour_ago(fake: &FakeStripe) -> i64 {
    let now = fake.now();
    now - now.rem_euclid(3600) - 12 * 3600
}

#[tokio::test]
async fn a_tiered_metered_price_is_found_by_its_lookup_key() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let catalog = catalog(&api).await;

    let meters = api.get("/v1/billing/meters", &[("status", "active")]).await;
    assert_eq!(meters.body["object"], "list");
    assert_eq!(meters.body["data"][0]["id"], catalog.meter.as_str());
    assert_eq!(meters.body["data"][0]["customer_mapping"]["type"], "by_id");

    let price = api.get(&format!("/v1/prices/{}", catalog.price), &[]).await;
    assert_eq!(price.body["recurring"]["meter"], catalog.meter.as_str());
    assert_eq!(price.body["recurring"]["usage_type"], "metered");
    assert!(
        price.body.get("tiers").is_none(),
        "tiers is includable: only when expanded"
    );

    let lookup = [
        ("lookup_keys[]", LOOKUP_KEY),
        ("active", "true"),
        ("expand[]", "data.product"),
        ("expand[]", "data.tiers"),
    ];
    let found = api.get("/v1/prices", &lookup).await;
    assert_eq!(found.status, 200, "{:?}", found.body);
    let data = found.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], catalog.price.as_str());
    assert_eq!(data[0]["product"]["id"], catalog.product.as_str());
    assert_eq!(data[0]["product"]["object"], "product");
    assert_eq!(data[0]["tiers"][0]["up_to"], 1_000_000);
    assert_eq!(data[0]["tiers"][0]["unit_amount"], 0);
    assert_eq!(data[0]["tiers"][1]["up_to"], Value::Null);
    assert_eq!(data[0]["tiers"][1]["unit_amount"], Value::Null);
    assert_eq!(data[0]["tiers"][1]["unit_amount_decimal"], "0.0002");

    // A second price under the key is refused unless it takes the key over.
    let taken = create_tiered_price(&api, &catalog.product, &catalog.meter, &[]).await;
    assert_eq!(taken.status, 400);
    assert_eq!(
        taken.error_message(),
        format!(
            "A price (`{}`) already uses that lookup key.",
            catalog.price
        )
    );
    assert_eq!(taken.body["error"]["param"], "lookup_key");
    let moved = create_tiered_price(
        &api,
        &catalog.product,
        &catalog.meter,
        &[("transfer_lookup_key", "true")],
    )
    .await;
    assert_eq!(moved.status, 200, "{:?}", moved.body);
    let found = api.get("/v1/prices", &lookup).await;
    assert_eq!(found.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(found.body["data"][0]["id"], moved.body["id"]);
    let old = api.get(&format!("/v1/prices/{}", catalog.price), &[]).await;
    assert_eq!(old.body["lookup_key"], Value::Null);
}

#[tokio::test]
async fn a_meter_event_sent_twice_with_one_identifier_is_counted_once() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let hour = an_hour_ago(&fake);

    let first = api
        .meter_event("acct1:tollgate_units:1", "cus_a", "42", hour + 60, None)
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["object"], "billing.meter_event");
    assert_eq!(first.body["payload"]["value"], "42");
    assert_eq!(first.body["timestamp"], hour + 60);

    let again = api
        .meter_event("acct1:tollgate_units:1", "cus_a", "42", hour + 60, None)
        .await
        .unwrap();
    assert_eq!(again.status, 400);
    assert_eq!(again.body["error"]["type"], "invalid_request_error");
    assert_eq!(
        again.error_message(),
        "An event already exists with identifier acct1:tollgate_units:1."
    );
    assert_eq!(fake.meter_events().len(), 1);
    assert_eq!(
        fake.meter_event_totals().into_iter().collect::<Vec<_>>(),
        [(("cus_a".to_owned(), hour), 42)]
    );
}

#[tokio::test]
async fn an_identifier_is_forgotten_after_a_day() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let hour = an_hour_ago(&fake);
    let status = async || {
        let answer = api.meter_event("id-1", "cus_a", "5", hour, None).await;
        answer.unwrap().status
    };
    assert_eq!(status().await, 200);
    fake.advance_clock(Duration::from_secs(23 * 3600));
    assert_eq!(status().await, 400);
    fake.advance_clock(Duration::from_secs(2 * 3600));
    assert_eq!(status().await, 200);
    assert_eq!(fake.meter_event_totals()[&("cus_a".to_owned(), hour)], 10);
}

#[tokio::test]
async fn meter_events_older_than_35_days_are_refused() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let old = fake.now() - 36 * 86_400;
    let refused = api
        .meter_event("old", "cus_a", "1", old, None)
        .await
        .unwrap();
    assert_eq!(refused.status, 400);
    assert!(
        refused
            .error_message()
            .starts_with("The event timestamp cannot be more than 35 days in past."),
        "{:?}",
        refused.body
    );
    assert!(fake.meter_events().is_empty());
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_other_parameters() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let hour = an_hour_ago(&fake);
    let ts = hour.to_string();
    let params = [
        ("event_name", METER_EVENT_NAME),
        ("payload[stripe_customer_id]", "cus_a"),
        ("payload[value]", "7"),
        ("identifier", "k1"),
        ("timestamp", ts.as_str()),
    ];
    let first = api
        .send(
            Method::POST,
            "/v1/billing/meter_events",
            &params,
            Some("k1"),
        )
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert!(first.headers.get("idempotent-replayed").is_none());

    // The same parameters in another order are the same request.
    let mut reordered = params;
    reordered.reverse();
    let replay = api
        .send(
            Method::POST,
            "/v1/billing/meter_events",
            &reordered,
            Some("k1"),
        )
        .await
        .unwrap();
    assert_eq!(replay.status, 200);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.body, first.body);
    assert_eq!(fake.meter_events().len(), 1);

    let mut changed = params;
    changed[2] = ("payload[value]", "8");
    let refused = api
        .send(
            Method::POST,
            "/v1/billing/meter_events",
            &changed,
            Some("k1"),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["error"]["type"], "idempotency_error");
    assert_eq!(
        refused.error_message(),
        "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than 'k1' if you meant to execute a different request."
    );
    assert_eq!(fake.meter_event_totals()[&("cus_a".to_owned(), hour)], 7);

    // The log keeps each request's parsed form and headers.
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].form["payload"]["value"], "8");
    assert_eq!(requests[2].headers["idempotency-key"], "k1");
    assert_eq!(requests[2].status, Some(400));
}

#[tokio::test]
async fn server_errors_and_rate_limits_apply_nothing() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let hour = an_hour_ago(&fake);
    let route = || Route::post("/v1/billing/meter_events");
    fake.fail_next(route(), 1, Fault::ServerError);
    fake.fail_next(
        route(),
        1,
        Fault::RateLimited {
            retry_after_secs: 2,
        },
    );

    // Other routes are not affected.
    assert_eq!(api.get("/v1/billing/meters", &[]).await.status, 200);

    let failed = api
        .meter_event("e1", "cus_a", "3", hour, Some("e1"))
        .await
        .unwrap();
    assert_eq!(failed.status, 500);
    assert_eq!(failed.body["error"]["type"], "api_error");
    let limited = api
        .meter_event("e1", "cus_a", "3", hour, Some("e1"))
        .await
        .unwrap();
    assert_eq!(limited.status, 429);
    assert_eq!(limited.headers["retry-after"], "2");
    assert_eq!(limited.body["error"]["code"], "rate_limit");
    assert!(fake.meter_events().is_empty());

    let accepted = api
        .meter_event("e1", "cus_a", "3", hour, Some("e1"))
        .await
        .unwrap();
    assert_eq!(accepted.status, 200);
    assert!(accepted.headers.get("idempotent-replayed").is_none());
    assert_eq!(fake.meter_event_totals()[&("cus_a".to_owned(), hour)], 3);
}

#[tokio::test]
async fn a_request_held_past_the_client_timeout_is_not_applied() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::with_timeout(&fake, Duration::from_millis(300));
    let hour = an_hour_ago(&fake);
    fake.fail_next(Route::post("/v1/billing/meter_events"), 1, Fault::Timeout);

    let timed_out = api.meter_event("t1", "cus_a", "9", hour, Some("t1")).await;
    assert!(timed_out.unwrap_err().is_timeout());
    assert!(fake.meter_events().is_empty());
    assert_eq!(fake.requests()[0].status, None);

    let retried = api
        .meter_event("t1", "cus_a", "9", hour, Some("t1"))
        .await
        .unwrap();
    assert_eq!(retried.status, 200);
    assert_eq!(fake.meter_events().len(), 1);
}

#[tokio::test]
async fn a_lost_answer_is_recovered_by_replay_or_by_the_duplicate_error() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let hour = an_hour_ago(&fake);
    let route = || Route::post("/v1/billing/meter_events");

    // Applied, then the connection closes unanswered.
    fake.fail_next(route(), 1, Fault::ResponseLost);
    let lost = api.meter_event("l1", "cus_a", "4", hour, Some("l1")).await;
    let error = lost.unwrap_err();
    assert!(!error.is_timeout(), "{error:?}");
    assert_eq!(fake.meter_events().len(), 1);
    // The same key gets the saved answer; another key, Stripe's duplicate error.
    let replay = api
        .meter_event("l1", "cus_a", "4", hour, Some("l1"))
        .await
        .unwrap();
    assert_eq!(replay.status, 200);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    let duplicate = api
        .meter_event("l1", "cus_a", "4", hour, Some("other"))
        .await
        .unwrap();
    assert_eq!(duplicate.status, 400);
    assert_eq!(
        duplicate.error_message(),
        "An event already exists with identifier l1."
    );

    // Applied, then answered 500.
    fake.fail_next(route(), 1, Fault::ResponseLost500);
    let failed = api
        .meter_event("l2", "cus_a", "6", hour, Some("l2"))
        .await
        .unwrap();
    assert_eq!(failed.status, 500);
    let replay = api
        .meter_event("l2", "cus_a", "6", hour, Some("l2"))
        .await
        .unwrap();
    assert_eq!(replay.status, 200);
    assert_eq!(replay.headers["idempotent-replayed"], "true");

    assert_eq!(fake.meter_events().len(), 2);
    assert_eq!(fake.meter_event_totals()[&("cus_a".to_owned(), hour)], 10);
}

#[tokio::test]
async fn an_unreachable_stripe_drops_connections_and_an_outage_answers_500() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    assert_eq!(api.get("/v1/billing/meters", &[]).await.status, 200);

    fake.set_reachable(false);
    let dropped = api.send(Method::GET, "/v1/billing/meters", &[], None).await;
    assert!(!dropped.unwrap_err().is_timeout());
    let hour = an_hour_ago(&fake);
    assert!(
        api.meter_event("u1", "cus_a", "1", hour, None)
            .await
            .is_err()
    );
    assert!(fake.meter_events().is_empty());

    fake.set_outage(Outage::ServerErrors);
    assert_eq!(api.get("/v1/billing/meters", &[]).await.status, 500);

    fake.set_reachable(true);
    assert_eq!(api.get("/v1/billing/meters", &[]).await.status, 200);
    let statuses: Vec<_> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(200), None, None, Some(500), Some(200)]);
}

#[tokio::test]
async fn random_faults_follow_the_seed() {
    async fn pattern() -> (Vec<u16>, usize) {
        let fake = FakeStripe::start().await.unwrap();
        fake.seed_faults(7);
        fake.fail_randomly(
            Route::post("/v1/billing/meter_events"),
            0.5,
            Fault::ServerError,
        );
        let api = Api::new(&fake);
        let hour = an_hour_ago(&fake);
        let mut statuses = Vec::new();
        for i in 0..20 {
            let id = format!("r{i}");
            statuses.push(
                api.meter_event(&id, "cus_a", "1", hour, None)
                    .await
                    .unwrap()
                    .status,
            );
        }
        (statuses, fake.meter_events().len())
    }
    let (first, accepted) = pattern().await;
    let (second, _) = pattern().await;
    assert_eq!(first, second);
    assert!(first.contains(&500) && first.contains(&200), "{first:?}");
    assert_eq!(accepted, first.iter().filter(|&&s| s == 200).count());
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_refused_with_stripes_401() {
    let fake = FakeStripe::start().await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/billing/meters", fake.base_url());

    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("You did not provide an API key.")
    );

    let wrong = http
        .post(&url)
        .bearer_auth("sk_test_wrongwrongwrong1234")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("display_name=x&event_name=y&default_aggregation%5Bformula%5D=sum")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(
        body["error"]["message"],
        "Invalid API Key provided: sk_test_***************1234"
    );

    // `curl -u sk_test_...:` (Basic) is accepted too.
    let basic = http
        .get(&url)
        .basic_auth(fake.secret_key(), Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let meters: Value = basic.json().await.unwrap();
    assert_eq!(
        meters["data"],
        serde_json::json!([]),
        "the refused create did nothing"
    );
}

#[tokio::test]
async fn unknown_and_missing_parameters_are_refused_like_stripe() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let unknown = api.post("/v1/products", &[("nam", "typo")]).await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.body["error"]["code"], "parameter_unknown");
    assert_eq!(unknown.error_message(), "Received unknown parameter: nam");
    let missing = api.post("/v1/products", &[]).await;
    assert_eq!(missing.body["error"]["code"], "parameter_missing");
    assert_eq!(missing.error_message(), "Missing required param: name.");
    assert_eq!(missing.body["error"]["param"], "name");
    let nowhere = api.get("/v1/nowhere", &[]).await;
    assert_eq!(nowhere.status, 404);
    assert!(
        nowhere
            .error_message()
            .starts_with("Unrecognized request URL (GET: /v1/nowhere).")
    );
    let absent = api.get("/v1/products/prod_missing", &[]).await;
    assert_eq!(absent.status, 404);
    assert_eq!(absent.body["error"]["code"], "resource_missing");
    assert_eq!(absent.error_message(), "No such product: 'prod_missing'");
}

#[tokio::test]
async fn checkout_returns_a_url_and_completes_into_a_subscription() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let catalog = catalog(&api).await;
    let customer = api
        .post(
            "/v1/customers",
            &[
                ("email", "ops@example.com"),
                ("metadata[account_id]", "acct1"),
            ],
        )
        .await;
    assert_eq!(customer.status, 200, "{:?}", customer.body);
    assert_eq!(customer.body["metadata"]["account_id"], "acct1");
    let customer = customer.body["id"].as_str().unwrap().to_owned();

    let mut params = vec![
        ("mode", "subscription"),
        ("customer", customer.as_str()),
        ("line_items[0][price]", catalog.price.as_str()),
        ("client_reference_id", "acct1"),
        ("success_url", "https://tollgate.example/billing/done"),
        ("cancel_url", "https://tollgate.example/billing"),
    ];
    let with_quantity = [params.clone(), vec![("line_items[0][quantity]", "1")]].concat();
    let refused = api.post("/v1/checkout/sessions", &with_quantity).await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.error_message(),
        "Quantity should not be specified where usage_type is `metered`. Remove quantity from `line_items[0]`"
    );

    let session = api.post("/v1/checkout/sessions", &params).await;
    assert_eq!(session.status, 200, "{:?}", session.body);
    let id = session.body["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cs_test_"));
    assert!(
        session.body["url"]
            .as_str()
            .unwrap()
            .starts_with("https://checkout.stripe.com/")
    );
    assert_eq!(session.body["status"], "open");
    assert_eq!(session.body["client_reference_id"], "acct1");

    let completed = fake.complete_checkout(&id).unwrap();
    assert_eq!(completed["status"], "complete");
    let subscription = completed["subscription"].as_str().unwrap();
    let subscription = api
        .get(&format!("/v1/subscriptions/{subscription}"), &[])
        .await;
    assert_eq!(subscription.status, 200);
    assert_eq!(subscription.body["status"], "active");
    assert_eq!(subscription.body["customer"], customer.as_str());
    assert_eq!(
        subscription.body["items"]["data"][0]["price"]["id"],
        catalog.price.as_str()
    );
    let session = api.get(&format!("/v1/checkout/sessions/{id}"), &[]).await;
    assert_eq!(session.body["status"], "complete");

    let portal = api
        .post(
            "/v1/billing_portal/sessions",
            &[
                ("customer", customer.as_str()),
                ("return_url", "https://tollgate.example/billing"),
            ],
        )
        .await;
    assert_eq!(portal.status, 200, "{:?}", portal.body);
    assert!(portal.body["id"].as_str().unwrap().starts_with("bps_"));
    assert!(
        portal.body["url"]
            .as_str()
            .unwrap()
            .starts_with("https://billing.stripe.com/")
    );

    params[1] = ("customer", "cus_nope");
    let unknown = api.post("/v1/checkout/sessions", &params).await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.error_message(), "No such customer: 'cus_nope'");
    assert_eq!(unknown.body["error"]["param"], "customer");
}

#[tokio::test]
async fn event_summaries_add_up_each_hour() {
    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let catalog = catalog(&api).await;
    let hour = an_hour_ago(&fake);
    for (identifier, customer, value, timestamp) in [
        ("s1", "cus_a", "5", hour + 10),
        ("s2", "cus_a", "7", hour + 20),
        ("s3", "cus_a", "11", hour + 3600 + 5),
        ("s4", "cus_b", "100", hour + 30),
        ("s5", "cus_a", "1000", hour + 7200),
    ] {
        let answer = api
            .meter_event(identifier, customer, value, timestamp, None)
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
    }
    let path = format!("/v1/billing/meters/{}/event_summaries", catalog.meter);
    let (start, end) = (hour.to_string(), (hour + 7200).to_string());
    let hourly = api
        .get(
            &path,
            &[
                ("customer", "cus_a"),
                ("start_time", &start),
                ("end_time", &end),
                ("value_grouping_window", "hour"),
            ],
        )
        .await;
    assert_eq!(hourly.status, 200, "{:?}", hourly.body);
    let data = hourly.body["data"].as_array().unwrap();
    let windows: Vec<_> = data
        .iter()
        .map(|s| {
            (
                s["start_time"].as_i64().unwrap(),
                s["end_time"].as_i64().unwrap(),
                s["aggregated_value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        windows,
        [(hour + 3600, hour + 7200, 11.0), (hour, hour + 3600, 12.0)],
        "newest first"
    );
    assert_eq!(data[0]["object"], "billing.meter_event_summary");
    assert_eq!(data[0]["meter"], catalog.meter.as_str());

    let whole = api
        .get(
            &path,
            &[
                ("customer", "cus_a"),
                ("start_time", &start),
                ("end_time", &end),
            ],
        )
        .await;
    assert_eq!(whole.body["data"][0]["aggregated_value"], 23.0);

    let missing = api
        .get(
            "/v1/billing/meters/mtr_missing/event_summaries",
            &[
                ("customer", "cus_a"),
                ("start_time", &start),
                ("end_time", &end),
            ],
        )
        .await;
    assert_eq!(missing.status, 404);
}

/// Every kind of answer, read with the types `async-stripe` 1.0 deserializes
/// Stripe's answers into (miniserde, as its client does): a field the fake
/// leaves out that the client requires fails here, not in production code.
#[tokio::test]
async fn every_answer_deserializes_into_async_stripe_types() {
    fn read<T: miniserde::Deserialize>(value: &Value) -> T {
        miniserde::json::from_str(&value.to_string()).unwrap_or_else(|e| {
            panic!(
                "{} does not deserialize: {e}: {value}",
                std::any::type_name::<T>()
            )
        })
    }
    // The check has teeth: a product without its required `images` fails.
    let bare = serde_json::json!({ "id": "prod_x", "object": "product", "name": "x" });
    assert!(miniserde::json::from_str::<stripe_shared::Product>(&bare.to_string()).is_err());

    let fake = FakeStripe::start().await.unwrap();
    let api = Api::new(&fake);
    let catalog = catalog(&api).await;
    let hour = an_hour_ago(&fake);

    let meter = api
        .get(&format!("/v1/billing/meters/{}", catalog.meter), &[])
        .await;
    read::<stripe_billing::BillingMeter>(&meter.body);
    let event = api
        .meter_event("d1", "cus_a", "3", hour, None)
        .await
        .unwrap();
    read::<stripe_billing::BillingMeterEvent>(&event.body);
    let (start, end) = (hour.to_string(), (hour + 3600).to_string());
    let summaries = api
        .get(
            &format!("/v1/billing/meters/{}/event_summaries", catalog.meter),
            &[
                ("customer", "cus_a"),
                ("start_time", &start),
                ("end_time", &end),
            ],
        )
        .await;
    read::<stripe_billing::BillingMeterEventSummary>(&summaries.body["data"][0]);

    let product = api
        .get(&format!("/v1/products/{}", catalog.product), &[])
        .await;
    read::<stripe_shared::Product>(&product.body);
    let price = api
        .get(
            &format!("/v1/prices/{}", catalog.price),
            &[("expand[]", "product"), ("expand[]", "tiers")],
        )
        .await;
    let price = read::<stripe_shared::Price>(&price.body);
    assert_eq!(price.tiers.map(|t| t.len()), Some(2));

    let customer = api
        .post("/v1/customers", &[("email", "a@example.com")])
        .await;
    read::<stripe_shared::Customer>(&customer.body);
    let customer = customer.body["id"].as_str().unwrap().to_owned();
    let session = api
        .post(
            "/v1/checkout/sessions",
            &[
                ("mode", "subscription"),
                ("customer", &customer),
                ("line_items[0][price]", &catalog.price),
                ("success_url", "https://tollgate.example/done"),
            ],
        )
        .await;
    read::<stripe_shared::CheckoutSession>(&session.body);
    let completed = fake
        .complete_checkout(session.body["id"].as_str().unwrap())
        .unwrap();
    read::<stripe_shared::CheckoutSession>(&completed);
    let subscription = api
        .get(
            &format!(
                "/v1/subscriptions/{}",
                completed["subscription"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    read::<stripe_shared::Subscription>(&subscription.body);
    let portal = api
        .post("/v1/billing_portal/sessions", &[("customer", &customer)])
        .await;
    read::<stripe_billing::BillingPortalSession>(&portal.body);

    let duplicate = api
        .meter_event("d1", "cus_a", "3", hour, None)
        .await
        .unwrap();
    read::<stripe_shared::ApiErrors>(&duplicate.body["error"]);
}
