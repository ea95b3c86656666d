//! The tiers as Stripe sells them: one Billing Meter per unit kind Tollgate
//! exports (token units, and each kind with a meter of its own), and for
//! every paid tier a product with a flat monthly price and, where the tier
//! allows overage, a metered price per kind in Stripe's "flat fee and
//! overages" shape. [`sync_catalog`] (`tollgate billing sync-catalog`)
//! creates what is missing and replaces what differs; run again, it sends
//! Stripe nothing but reads.
//!
//! Every object is found by a name Tollgate chooses, not by anything a
//! previous run remembered, so a run that stopped half way is finished by
//! the next one:
//!
//! - the meter by its `event_name` among the active meters (Stripe allows
//!   one active meter per event name);
//! - a tier's product by its id, `tollgate_tier_{name}` ([`product_id`]);
//! - a price by its lookup key. A price's amounts cannot change, so a price
//!   that differs is replaced: the new price takes the lookup key over
//!   (`transfer_lookup_key`), then the old one is archived. Subscriptions
//!   keep the price they have until moved. Prices made here also carry their
//!   lookup key in metadata, so an old price left active by a run that
//!   stopped between those two steps is archived by the next run.
//!
//! A tier with neither a monthly price nor overage (the free tier) has
//! nothing to sell and is left out. Prices no longer in the catalog are left
//! alone: taking a price off sale is for a person to decide.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::str::FromStr;

use anyhow::{anyhow, bail};
use stripe::{Client, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::BillingMeter;
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula,
    CreateBillingMeterValueSettings, ListBillingMeter,
};
use stripe_product::price::{
    CreatePrice, CreatePriceRecurring, CreatePriceRecurringInterval, CreatePriceRecurringUsageType,
    CreatePriceTiers, CreatePriceTiersUpTo, ListPrice, UpdatePrice,
};
use stripe_product::product::{CreateProduct, RetrieveProduct, UpdateProduct};
use stripe_shared::{Price, PriceBillingScheme, PriceTiersMode, Product};
use uuid::Uuid;

/// The meter's name in the Dashboard and on invoices.
pub const METER_DISPLAY_NAME: &str = "Tollgate units";
/// The meter event payload keys: the ones the exporter sends
/// ([`crate::stripe_api::StripeMeterEvents`]).
pub const CUSTOMER_PAYLOAD_KEY: &str = "stripe_customer_id";
pub const VALUE_PAYLOAD_KEY: &str = "value";
/// Metadata naming the tier on its product.
pub const TIER_METADATA_KEY: &str = "tollgate_tier";
/// Metadata naming the lookup key a price was made for, kept after the key
/// moves on.
pub const LOOKUP_KEY_METADATA_KEY: &str = "tollgate_lookup_key";

/// Stripe's limits: `lookup_key` is at most 200 characters; `lookup_keys[]`
/// takes up to 10 keys; list pages hold up to 100 objects.
const LOOKUP_KEY_MAX_LEN: usize = 200;
const LOOKUP_KEYS_PER_LIST: usize = 10;
const PAGE_SIZE: i64 = 100;
/// `unit_amount_decimal` takes at most 12 decimal places (of a cent).
const CENT_DECIMALS: usize = 12;
/// Attempts at a request that got no answer at all (see [`send`]).
const ATTEMPTS: u32 = 3;

/// What Tollgate sells, as `sync_catalog` puts it in Stripe.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    /// The Billing Meter's `event_name` (the exporter's `meter_event_name`).
    pub meter_event_name: String,
    /// `usd`: the amounts below are in US dollars and cents.
    pub currency: String,
    pub tiers: Vec<CatalogTier>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CatalogTier {
    /// The tier's name, e.g. `pro`; also names its product.
    pub name: String,
    /// The flat monthly price (licensed, quantity 1).
    pub price_lookup_key: String,
    /// The flat amount, USD cents.
    pub monthly_price_cents: i64,
    /// Units the flat price includes; overage is billed beyond them.
    pub included_units: u64,
    /// The metered overage price, if the tier allows overage.
    pub overage: Option<Overage>,
    /// Overage prices on the meters of other unit kinds (images, …).
    pub unit_overages: Vec<UnitOverage>,
}

/// A tier's overage in a unit kind with a meter of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitOverage {
    /// The kind's Billing Meter `event_name`.
    pub meter_event_name: String,
    /// Units of the kind the flat price includes.
    pub included_units: u64,
    pub overage: Overage,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Overage {
    pub lookup_key: String,
    /// USD per unit beyond the included ones, e.g. `0.000002`.
    pub usd_per_unit: f64,
}

/// What [`sync_catalog`] did, one [`Action`] per Stripe object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub actions: Vec<Action>,
}

impl SyncReport {
    /// Whether anything in Stripe was created, updated or archived.
    pub fn changed(&self) -> bool {
        self.actions
            .iter()
            .any(|action| action.outcome != Outcome::Unchanged)
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for action in &self.actions {
            writeln!(f, "{action}")?;
        }
        Ok(())
    }
}

/// One object and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub outcome: Outcome,
    pub kind: ObjectKind,
    /// The Stripe id (for a replaced price, the new one).
    pub id: String,
    /// The meter's event name, the product's tier or the price's lookup key.
    pub key: String,
    /// The object as it now is, and for an update what changed.
    pub detail: String,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key_name = match self.kind {
            ObjectKind::Meter => "event name",
            ObjectKind::Product => "tier",
            ObjectKind::Price => "lookup key",
        };
        write!(
            f,
            "{} {} {} ({key_name} {}): {}",
            self.outcome, self.kind, self.id, self.key, self.detail
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// Changed in place (a product), or replaced by a new object that took
    /// the old one's place (a price: new price, old one archived).
    Updated,
    Unchanged,
    /// A price this sync had replaced, left active by a run that stopped
    /// before archiving it.
    Archived,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Archived => "archived",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Meter,
    Product,
    Price,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Meter => "meter",
            ObjectKind::Product => "product",
            ObjectKind::Price => "price",
        })
    }
}

/// The product id of tier `name`.
///
/// Products are found by an id chosen here rather than by metadata: a
/// product is then one retrieve away, and creating it twice (a rerun after
/// an answer was lost, two runs at once) fails with
/// `resource_already_exists` instead of making a second product. Metadata
/// can only be found by listing every product or through Search, which
/// lags behind writes by up to a minute, so a run right after another would
/// not see what that one made.
pub fn product_id(tier: &str) -> String {
    format!("tollgate_tier_{tier}")
}

/// Brings Stripe's meter, products and prices in line with `catalog`.
///
/// Stops at the first request Stripe refuses, saying which object; what was
/// done before it stays done, and running again finishes the rest.
pub async fn sync_catalog(client: &Client, catalog: &Catalog) -> Result<SyncReport, anyhow::Error> {
    let tiers = plan(catalog)?;
    let mut report = SyncReport::default();
    // The token meter always, and every meter a price is metered on.
    let mut meters: HashMap<String, String> = HashMap::new();
    let priced = tiers
        .iter()
        .flat_map(|t| &t.prices)
        .filter_map(|p| match &p.shape {
            PriceShape::Overage { meter, .. } => Some(meter),
            PriceShape::Flat { .. } => None,
        });
    for event_name in std::iter::once(&catalog.meter_event_name).chain(priced) {
        if !meters.contains_key(event_name) {
            let id = sync_meter(client, event_name, &mut report).await?;
            meters.insert(event_name.clone(), id);
        }
    }
    let lookup_keys: Vec<String> = tiers
        .iter()
        .flat_map(|tier| tier.prices.iter().map(|price| price.lookup_key.clone()))
        .collect();
    let mut current = active_prices_by_lookup_key(client, &lookup_keys).await?;
    for tier in &tiers {
        sync_product(client, tier, &mut report).await?;
        for price in &tier.prices {
            let meter = match &price.shape {
                PriceShape::Overage { meter, .. } => meters.get(meter).map_or("", String::as_str),
                PriceShape::Flat { .. } => "",
            };
            let terms = price.terms(&tier.product_id, &catalog.currency, meter);
            let existing = current.remove(&price.lookup_key);
            sync_price(client, price, &terms, meter, existing, &mut report).await?;
        }
        archive_replaced_prices(client, tier, &mut report).await?;
    }
    Ok(report)
}

// ---- The catalog, checked --------------------------------------------------

/// A tier that sells something, with the ids and amounts Stripe gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TierPlan {
    name: String,
    product_id: String,
    product_name: String,
    prices: Vec<PricePlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PricePlan {
    tier: String,
    lookup_key: String,
    shape: PriceShape,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PriceShape {
    /// Licensed, per month.
    Flat { cents: i64 },
    /// Metered on the meter of `meter` (its event name), per month:
    /// `included` units free, then `cents_per_unit` (a decimal string) each.
    Overage {
        meter: String,
        included: i64,
        cents_per_unit: String,
    },
}

/// Checks `catalog` and works out what Stripe should hold, before anything
/// is sent.
fn plan(catalog: &Catalog) -> anyhow::Result<Vec<TierPlan>> {
    if !catalog.currency.eq_ignore_ascii_case("usd") {
        bail!(
            "catalog currency is `{}`: tier amounts are given in US dollars and cents \
             (monthly_price_cents, usd_per_unit), so the currency must be `usd`",
            catalog.currency
        );
    }
    if catalog.meter_event_name.trim().is_empty() {
        bail!("catalog meter_event_name is empty");
    }
    let mut names = HashSet::new();
    let mut lookup_keys = HashSet::new();
    let mut tiers = Vec::new();
    for tier in &catalog.tiers {
        let name = &tier.name;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            bail!(
                "tier name `{name}` cannot be part of a Stripe product id: use letters, digits, \
                 `_` and `-`"
            );
        }
        if !names.insert(name.as_str()) {
            bail!("tier `{name}` is in the catalog twice");
        }
        if tier.monthly_price_cents < 0 {
            bail!(
                "tier `{name}`: monthly_price_cents is {}, below zero",
                tier.monthly_price_cents
            );
        }
        if tier.monthly_price_cents == 0 && tier.overage.is_none() && tier.unit_overages.is_empty()
        {
            continue; // free: nothing to sell
        }
        let mut prices = vec![PricePlan {
            tier: name.clone(),
            lookup_key: tier.price_lookup_key.clone(),
            shape: PriceShape::Flat {
                cents: tier.monthly_price_cents,
            },
        }];
        let token_overage = tier.overage.as_ref().map(|overage| UnitOverage {
            meter_event_name: catalog.meter_event_name.clone(),
            included_units: tier.included_units,
            overage: overage.clone(),
        });
        for unit in token_overage.iter().chain(&tier.unit_overages) {
            let meter = &unit.meter_event_name;
            let included = i64::try_from(unit.included_units).map_err(|_| {
                anyhow!(
                    "tier `{name}`: {} included units on `{meter}` is more than Stripe takes",
                    unit.included_units
                )
            })?;
            let cents_per_unit = cents_decimal(unit.overage.usd_per_unit)
                .map_err(|e| anyhow!("tier `{name}`: overage usd_per_unit on `{meter}`: {e}"))?;
            prices.push(PricePlan {
                tier: name.clone(),
                lookup_key: unit.overage.lookup_key.clone(),
                shape: PriceShape::Overage {
                    meter: meter.clone(),
                    included,
                    cents_per_unit,
                },
            });
        }
        for price in &prices {
            let key = &price.lookup_key;
            if key.is_empty() || key.chars().count() > LOOKUP_KEY_MAX_LEN {
                bail!("tier `{name}`: lookup key `{key}` must be 1 to 200 characters");
            }
            // Two prices under one key would take it from each other on
            // every run.
            if !lookup_keys.insert(key.clone()) {
                bail!("tier `{name}`: lookup key `{key}` is used twice in the catalog");
            }
        }
        tiers.push(TierPlan {
            name: name.clone(),
            product_id: product_id(name),
            product_name: product_name(name),
            prices,
        });
    }
    Ok(tiers)
}

/// `pro` → `Tollgate Pro`.
fn product_name(tier: &str) -> String {
    let mut chars = tier.chars();
    let initial: String = chars
        .next()
        .map(|c| c.to_uppercase().collect())
        .unwrap_or_default();
    format!("Tollgate {initial}{}", chars.as_str())
}

/// `usd` dollars as a decimal string of cents, as `unit_amount_decimal`
/// takes it: no exponent, no float noise (`0.000002` → `"0.0002"`), at most
/// 12 decimal places. An amount that 12 places would change by more than a
/// billionth of itself is refused rather than rounded.
fn cents_decimal(usd: f64) -> anyhow::Result<String> {
    if !usd.is_finite() || usd < 0.0 {
        bail!("{usd} is not an amount");
    }
    // Dollars with 14 decimals are cents with 12.
    let dollars = format!("{usd:.prec$}", prec = CENT_DECIMALS + 2);
    let rounded: f64 = dollars.parse()?;
    if (rounded - usd).abs() > usd * 1e-9 {
        bail!("{usd} USD needs more than {CENT_DECIMALS} decimal places of a cent");
    }
    let (whole, fraction) = dollars.split_once('.').unwrap_or((&dollars, ""));
    let (cents, sub_cents) = fraction.split_at(fraction.len().min(2));
    Ok(normalize_decimal(&format!("{whole}{cents}.{sub_cents}")))
}

/// A decimal string without leading or trailing zeros (`"0300.50"` →
/// `"300.5"`, `"0.000"` → `"0"`), so equal amounts compare equal whichever
/// way Stripe writes them.
fn normalize_decimal(value: &str) -> String {
    let value = value.trim();
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let whole = whole.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    if fraction.is_empty() {
        whole.to_owned()
    } else {
        format!("{whole}.{fraction}")
    }
}

// ---- Price terms: what makes two prices the same ---------------------------

/// Everything about a price that the wanted one must match, each rendered
/// as text so a difference can be shown as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PriceTerms {
    product: String,
    currency: String,
    /// `month licensed`, `month metered on mtr_…`, `every 3 month …`.
    recurring: String,
    /// Cents: `per unit 2900`, `graduated: up to 1000 at 0, then at 0.0002`.
    amount: String,
}

impl PriceTerms {
    fn of(price: &Price) -> Self {
        let recurring = match &price.recurring {
            None => "one-time".to_owned(),
            Some(r) => recurring_text(
                r.interval.as_str(),
                r.interval_count,
                r.usage_type.as_str(),
                r.meter.as_deref(),
            ),
        };
        let mut amount = match &price.billing_scheme {
            PriceBillingScheme::PerUnit => format!(
                "per unit {}",
                cents_text(price.unit_amount, price.unit_amount_decimal.as_deref())
            ),
            PriceBillingScheme::Tiered => {
                let tiers: Vec<(Option<i64>, String, String)> = price
                    .tiers
                    .iter()
                    .flatten()
                    .map(|tier| {
                        (
                            tier.up_to,
                            cents_text(tier.unit_amount, tier.unit_amount_decimal.as_deref()),
                            cents_text(tier.flat_amount, tier.flat_amount_decimal.as_deref()),
                        )
                    })
                    .collect();
                let mode = price.tiers_mode.as_ref().map_or("", PriceTiersMode::as_str);
                tiers_text(mode, &tiers)
            }
            // A scheme this code does not know never matches: the price is
            // replaced by one it does.
            other => format!("{} billing", other.as_str()),
        };
        if price.transform_quantity.is_some() || price.custom_unit_amount.is_some() {
            amount.push_str(" (adjusted quantity or customer-chosen amount)");
        }
        Self {
            product: price.product.id().as_str().to_owned(),
            currency: price.currency.to_string(),
            recurring,
            amount,
        }
    }

    /// The differences from `wanted`, as `field: have → want`.
    fn differences(&self, wanted: &PriceTerms) -> Vec<String> {
        [
            ("product", &self.product, &wanted.product),
            ("currency", &self.currency, &wanted.currency),
            ("recurring", &self.recurring, &wanted.recurring),
            ("amount", &self.amount, &wanted.amount),
        ]
        .into_iter()
        .filter(|(_, have, want)| have != want)
        .map(|(field, have, want)| format!("{field}: {have} → {want}"))
        .collect()
    }
}

impl PricePlan {
    fn terms(&self, product: &str, currency: &str, meter: &str) -> PriceTerms {
        let (recurring, amount) = match &self.shape {
            PriceShape::Flat { cents } => (
                recurring_text("month", 1, "licensed", None),
                format!("per unit {cents}"),
            ),
            PriceShape::Overage {
                included,
                cents_per_unit,
                ..
            } => {
                let amount = if *included == 0 {
                    format!("per unit {cents_per_unit}")
                } else {
                    tiers_text(
                        "graduated",
                        &[
                            (Some(*included), "0".to_owned(), "0".to_owned()),
                            (None, cents_per_unit.clone(), "0".to_owned()),
                        ],
                    )
                };
                (recurring_text("month", 1, "metered", Some(meter)), amount)
            }
        };
        PriceTerms {
            product: product.to_owned(),
            currency: currency.to_ascii_lowercase(),
            recurring,
            amount,
        }
    }

    /// One line on what the price charges, for the report.
    fn summary(&self, terms: &PriceTerms) -> String {
        match &self.shape {
            PriceShape::Flat { cents } => format!("{cents} {}/month", terms.currency),
            PriceShape::Overage {
                included,
                cents_per_unit,
                ..
            } => format!(
                "first {included} units included, then {cents_per_unit} {} cents/unit, {}",
                terms.currency, terms.recurring
            ),
        }
    }
}

fn recurring_text(interval: &str, count: u64, usage: &str, meter: Option<&str>) -> String {
    let every = if count == 1 {
        interval.to_owned()
    } else {
        format!("every {count} {interval}")
    };
    match meter {
        Some(meter) => format!("{every} {usage} on {meter}"),
        None => format!("{every} {usage}"),
    }
}

fn cents_text(integer: Option<i64>, decimal: Option<&str>) -> String {
    match (decimal, integer) {
        (Some(decimal), _) => normalize_decimal(decimal),
        (None, Some(integer)) => integer.to_string(),
        (None, None) => "0".to_owned(),
    }
}

/// `(up_to, unit amount, flat amount)` per tier.
fn tiers_text(mode: &str, tiers: &[(Option<i64>, String, String)]) -> String {
    let tiers: Vec<String> = tiers
        .iter()
        .map(|(up_to, unit, flat)| {
            let bound = up_to.map_or("then".to_owned(), |n| format!("up to {n}"));
            let flat = if flat == "0" {
                String::new()
            } else {
                format!(" + {flat} flat")
            };
            format!("{bound} at {unit}{flat}")
        })
        .collect();
    format!("{mode}: {}", tiers.join(", "))
}

// ---- Stripe -----------------------------------------------------------------

/// Finds the active meter for `event_name`, or creates it. Returns its id.
async fn sync_meter(
    client: &Client,
    event_name: &str,
    report: &mut SyncReport,
) -> anyhow::Result<String> {
    let meters = active_meters(client)
        .await
        .map_err(|e| failed("listing active billing meters", &e))?;
    let summary = format!(
        "sum of `{VALUE_PAYLOAD_KEY}` per `{CUSTOMER_PAYLOAD_KEY}` (\"{METER_DISPLAY_NAME}\")"
    );
    if let Some(meter) = meters.into_iter().find(|m| m.event_name == event_name) {
        check_meter(&meter)?;
        let id = meter.id.as_str().to_owned();
        record(
            report,
            Outcome::Unchanged,
            ObjectKind::Meter,
            &id,
            event_name,
            summary,
        );
        return Ok(id);
    }
    let meter = send(|strategy| {
        CreateBillingMeter::new(
            CreateBillingMeterDefaultAggregation::new(
                CreateBillingMeterDefaultAggregationFormula::Sum,
            ),
            METER_DISPLAY_NAME,
            event_name,
        )
        .customer_mapping(CreateBillingMeterCustomerMapping::new(
            CUSTOMER_PAYLOAD_KEY,
            CreateBillingMeterCustomerMappingType::ById,
        ))
        .value_settings(CreateBillingMeterValueSettings::new(VALUE_PAYLOAD_KEY))
        .customize()
        .request_strategy(strategy)
        .send(client)
    })
    .await
    .map_err(|e| failed(&format!("creating billing meter `{event_name}`"), &e))?;
    let id = meter.id.as_str().to_owned();
    record(
        report,
        Outcome::Created,
        ObjectKind::Meter,
        &id,
        event_name,
        summary,
    );
    Ok(id)
}

/// A meter that sums something else, or maps customers by another key,
/// would bill wrongly, and Stripe cannot change either on an existing
/// meter: that takes a person.
fn check_meter(meter: &BillingMeter) -> anyhow::Result<()> {
    let formula = meter.default_aggregation.formula.as_str();
    let customer_key = meter.customer_mapping.event_payload_key.as_str();
    let value_key = meter.value_settings.event_payload_key.as_str();
    if formula != "sum" || customer_key != CUSTOMER_PAYLOAD_KEY || value_key != VALUE_PAYLOAD_KEY {
        bail!(
            "billing meter {} (event name `{}`) aggregates `{formula}` of `{value_key}` per \
             `{customer_key}`, but Tollgate sends `{VALUE_PAYLOAD_KEY}` per \
             `{CUSTOMER_PAYLOAD_KEY}` to be summed; Stripe cannot change that on a meter: \
             deactivate it in the Dashboard and sync again, or use another event name",
            meter.id.as_str(),
            meter.event_name
        );
    }
    Ok(())
}

async fn active_meters(client: &Client) -> Result<Vec<BillingMeter>, StripeError> {
    let mut meters = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut list = ListBillingMeter::new()
            .status(stripe_billing::BillingMeterStatus::Active)
            .limit(PAGE_SIZE);
        if let Some(after) = &after {
            list = list.starting_after(after.clone());
        }
        let page =
            send(|strategy| list.customize().request_strategy(strategy).send(client)).await?;
        after = page.data.last().map(|meter| meter.id.as_str().to_owned());
        meters.extend(page.data);
        if !page.has_more || after.is_none() {
            return Ok(meters);
        }
    }
}

/// Retrieves the tier's product, creating it or putting its name back (and
/// reactivating it) as needed.
async fn sync_product(
    client: &Client,
    tier: &TierPlan,
    report: &mut SyncReport,
) -> anyhow::Result<()> {
    let id = tier.product_id.as_str();
    let wanted = &tier.product_name;
    let retrieve = RetrieveProduct::new(id);
    let existing = match send(|s| retrieve.customize().request_strategy(s).send(client)).await {
        Ok(product) => Some(product),
        Err(StripeError::Stripe(_, 404)) => None,
        Err(e) => return Err(failed(&format!("retrieving product {id}"), &e)),
    };
    let Some(product) = existing else {
        let metadata = HashMap::from([(TIER_METADATA_KEY.to_owned(), tier.name.clone())]);
        send(|s| {
            CreateProduct::new(wanted.clone())
                .id(id)
                .metadata(metadata.clone())
                .customize()
                .request_strategy(s)
                .send(client)
        })
        .await
        .map_err(|e| failed(&format!("creating product {id} (tier {})", tier.name), &e))?;
        let detail = format!("\"{wanted}\"");
        record(
            report,
            Outcome::Created,
            ObjectKind::Product,
            id,
            &tier.name,
            detail,
        );
        return Ok(());
    };
    let changes = product_changes(&product, wanted);
    if changes.is_empty() {
        let detail = format!("\"{wanted}\"");
        record(
            report,
            Outcome::Unchanged,
            ObjectKind::Product,
            id,
            &tier.name,
            detail,
        );
        return Ok(());
    }
    send(|s| {
        UpdateProduct::new(id)
            .name(wanted.clone())
            .active(true)
            .customize()
            .request_strategy(s)
            .send(client)
    })
    .await
    .map_err(|e| failed(&format!("updating product {id} (tier {})", tier.name), &e))?;
    let detail = format!("\"{wanted}\" ({})", changes.join(", "));
    record(
        report,
        Outcome::Updated,
        ObjectKind::Product,
        id,
        &tier.name,
        detail,
    );
    Ok(())
}

fn product_changes(product: &Product, wanted_name: &str) -> Vec<String> {
    let mut changes = Vec::new();
    if product.name != wanted_name {
        changes.push(format!("was named \"{}\"", product.name));
    }
    if !product.active {
        changes.push("reactivated".to_owned());
    }
    changes
}

/// The active price holding each of `lookup_keys`, with its tiers.
async fn active_prices_by_lookup_key(
    client: &Client,
    lookup_keys: &[String],
) -> anyhow::Result<HashMap<String, Price>> {
    let mut prices = HashMap::new();
    for keys in lookup_keys.chunks(LOOKUP_KEYS_PER_LIST) {
        // One price per lookup key at most: a page of 100 holds them all.
        let list = ListPrice::new()
            .lookup_keys(keys.to_vec())
            .active(true)
            .expand(vec!["data.tiers".to_owned()])
            .limit(PAGE_SIZE);
        let page = send(|s| list.customize().request_strategy(s).send(client))
            .await
            .map_err(|e| failed(&format!("listing the prices with lookup keys {keys:?}"), &e))?;
        for price in page.data {
            if let Some(key) = price.lookup_key.clone() {
                prices.insert(key, price);
            }
        }
    }
    Ok(prices)
}

/// Leaves `existing` if it matches, creates the price if there is none, and
/// replaces it otherwise.
async fn sync_price(
    client: &Client,
    price: &PricePlan,
    terms: &PriceTerms,
    meter: &str,
    existing: Option<Price>,
    report: &mut SyncReport,
) -> anyhow::Result<()> {
    let key = price.lookup_key.as_str();
    let summary = price.summary(terms);
    let differences = match &existing {
        Some(old) => PriceTerms::of(old).differences(terms),
        None => Vec::new(),
    };
    if let Some(old) = &existing
        && differences.is_empty()
    {
        record(
            report,
            Outcome::Unchanged,
            ObjectKind::Price,
            old.id.as_str(),
            key,
            summary,
        );
        return Ok(());
    }
    let what = format!(
        "creating price with lookup key `{key}` (tier {})",
        price.tier
    );
    let created = send(|s| {
        create_price(price, terms, meter)
            .customize()
            .request_strategy(s)
            .send(client)
    })
    .await
    .map_err(|e| failed(&what, &e))?;
    let id = created.id.as_str();
    let Some(old) = existing else {
        record(
            report,
            Outcome::Created,
            ObjectKind::Price,
            id,
            key,
            summary,
        );
        return Ok(());
    };
    let old_id = old.id.as_str();
    archive(client, old_id).await.map_err(|e| {
        failed(
            &format!(
                "archiving price {old_id}, replaced by {id} under lookup key `{key}` (the \
                     next sync archives it)"
            ),
            &e,
        )
    })?;
    let detail = format!(
        "{summary}; replaces {old_id}, now archived ({})",
        differences.join("; ")
    );
    record(report, Outcome::Updated, ObjectKind::Price, id, key, detail);
    Ok(())
}

/// The price `plan` wants, taking its lookup key over from whichever price
/// holds it: the one being replaced, or an archived price (an archived
/// price keeps its lookup key, which would otherwise block this one).
fn create_price(price: &PricePlan, terms: &PriceTerms, meter: &str) -> CreatePrice {
    let request = CreatePrice::new(parse_as(|p: &Price| &p.currency, &terms.currency))
        .product(terms.product.clone())
        .lookup_key(price.lookup_key.clone())
        .transfer_lookup_key(true)
        .metadata(HashMap::from([(
            LOOKUP_KEY_METADATA_KEY.to_owned(),
            price.lookup_key.clone(),
        )]));
    match &price.shape {
        PriceShape::Flat { cents } => {
            let mut recurring = CreatePriceRecurring::new(CreatePriceRecurringInterval::Month);
            recurring.usage_type = Some(CreatePriceRecurringUsageType::Licensed);
            request.recurring(recurring).unit_amount(*cents)
        }
        PriceShape::Overage {
            included,
            cents_per_unit,
            ..
        } => {
            let mut recurring = CreatePriceRecurring::new(CreatePriceRecurringInterval::Month);
            recurring.usage_type = Some(CreatePriceRecurringUsageType::Metered);
            recurring.meter = Some(meter.to_owned());
            let request = request.recurring(recurring);
            if *included == 0 {
                // Nothing included: one rate from the first unit.
                return request
                    .billing_scheme(PriceBillingScheme::PerUnit)
                    .unit_amount_decimal(cents_per_unit.clone());
            }
            let mut included_tier = CreatePriceTiers::new(CreatePriceTiersUpTo::I64(*included));
            included_tier.unit_amount_decimal = Some("0".to_owned());
            let mut overage_tier = CreatePriceTiers::new(CreatePriceTiersUpTo::Inf);
            overage_tier.unit_amount_decimal = Some(cents_per_unit.clone());
            request
                .billing_scheme(PriceBillingScheme::Tiered)
                .tiers_mode(PriceTiersMode::Graduated)
                .tiers(vec![included_tier, overage_tier])
        }
    }
}

async fn archive(client: &Client, price: &str) -> Result<Price, StripeError> {
    let update = UpdatePrice::new(price).active(false);
    send(|s| update.customize().request_strategy(s).send(client)).await
}

/// Archives the tier's active prices that were made for one of its lookup
/// keys but no longer hold it: replaced by a run that stopped before
/// archiving them.
async fn archive_replaced_prices(
    client: &Client,
    tier: &TierPlan,
    report: &mut SyncReport,
) -> anyhow::Result<()> {
    let keys: HashSet<&str> = tier.prices.iter().map(|p| p.lookup_key.as_str()).collect();
    let mut after: Option<String> = None;
    loop {
        let mut list = ListPrice::new()
            .product(tier.product_id.clone())
            .active(true)
            .limit(PAGE_SIZE);
        if let Some(after) = &after {
            list = list.starting_after(after.clone());
        }
        let page = send(|s| list.customize().request_strategy(s).send(client))
            .await
            .map_err(|e| {
                failed(
                    &format!("listing the active prices of product {}", tier.product_id),
                    &e,
                )
            })?;
        after = page.data.last().map(|price| price.id.as_str().to_owned());
        for price in &page.data {
            let Some(made_for) = price.metadata.get(LOOKUP_KEY_METADATA_KEY) else {
                continue;
            };
            let replaced = keys.contains(made_for.as_str())
                && price.lookup_key.as_deref() != Some(made_for.as_str());
            if !replaced {
                continue;
            }
            let id = price.id.as_str();
            archive(client, id)
                .await
                .map_err(|e| failed(&format!("archiving replaced price {id}"), &e))?;
            let detail = format!("replaced earlier, no longer holds lookup key `{made_for}`");
            record(
                report,
                Outcome::Archived,
                ObjectKind::Price,
                id,
                made_for,
                detail,
            );
        }
        if !page.has_more || after.is_none() {
            return Ok(());
        }
    }
}

/// Sends a request built by `attempt`, again under the same Idempotency-Key
/// when no answer came back (connection closed, timed out) or Stripe was
/// still busy with that key (409). A request Stripe applied but whose answer
/// was lost is then answered from Stripe's saved copy instead of being
/// applied twice.
///
/// The key is new for every call: a key derived from the object would also
/// dedupe across runs, but Stripe replays a key's first answer for 24 hours,
/// 500s included (docs.stripe.com/idempotency), which would stop every rerun
/// for a day after one server error. Reruns are safe without it: every
/// object is found again by event name, id or lookup key. Other errors are
/// not retried: the run stops and says which object failed.
async fn send<T, F, Fut>(mut attempt: F) -> Result<T, StripeError>
where
    F: FnMut(RequestStrategy) -> Fut,
    Fut: Future<Output = Result<T, StripeError>>,
{
    let key = IdempotencyKey::new(format!("tollgate-catalog-{}", Uuid::now_v7()))
        .map_err(|e| StripeError::ConfigError(e.to_string()))?;
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt(RequestStrategy::Idempotent(key.clone())).await {
            Err(
                StripeError::ClientError(_) | StripeError::Timeout | StripeError::Stripe(_, 409),
            ) if tries < ATTEMPTS => {
                continue;
            }
            result => return result,
        }
    }
}

fn failed(doing: &str, error: &StripeError) -> anyhow::Error {
    let cause = match error {
        StripeError::Stripe(details, status) => {
            let mut cause = format!(
                "Stripe answered {status}: {}",
                details.message.as_deref().unwrap_or("(no message)")
            );
            if let Some(param) = &details.param {
                cause.push_str(&format!(" (param {param})"));
            }
            cause
        }
        StripeError::ClientError(e) => format!("no answer from Stripe: {e}"),
        StripeError::Timeout => "no answer from Stripe: timed out".to_owned(),
        StripeError::JSONDeserialize(e) => format!("unreadable answer from Stripe: {e}"),
        StripeError::ConfigError(e) => format!("Stripe client: {e}"),
    };
    anyhow!("{doing}: {cause}")
}

fn record(
    report: &mut SyncReport,
    outcome: Outcome,
    kind: ObjectKind,
    id: &str,
    key: &str,
    detail: String,
) {
    let action = Action {
        outcome,
        kind,
        id: id.to_owned(),
        key: key.to_owned(),
        detail,
    };
    // Logged as it happens: if a later object fails, the report is lost but
    // the log says what was already done.
    tracing::info!(%action, "stripe catalog");
    report.actions.push(action);
}

/// `code` parsed as the type of `field`. The currency type lives in
/// `async-stripe-types`, which this crate does not name as a dependency;
/// it is reached through the `Price` field that has it.
fn parse_as<T: FromStr<Err = Infallible>>(_field: fn(&Price) -> &T, code: &str) -> T {
    match code.parse() {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(tiers: Vec<CatalogTier>) -> Catalog {
        Catalog {
            meter_event_name: "tollgate_units".to_owned(),
            currency: "usd".to_owned(),
            tiers,
        }
    }

    fn tier(name: &str, cents: i64, overage: Option<(&str, f64)>) -> CatalogTier {
        CatalogTier {
            name: name.to_owned(),
            price_lookup_key: format!("{name}_monthly"),
            monthly_price_cents: cents,
            included_units: 1_000_000,
            overage: overage.map(|(key, usd)| Overage {
                lookup_key: key.to_owned(),
                usd_per_unit: usd,
            }),
            unit_overages: Vec::new(),
        }
    }

    #[test]
    fn usd_per_unit_becomes_cents_without_float_noise() {
        assert_eq!(cents_decimal(0.000002).unwrap(), "0.0002");
        assert_eq!(cents_decimal(0.01).unwrap(), "1");
        assert_eq!(cents_decimal(1.5).unwrap(), "150");
        assert_eq!(cents_decimal(0.1 + 0.2).unwrap(), "30");
        assert_eq!(cents_decimal(0.00000123).unwrap(), "0.000123");
        assert_eq!(cents_decimal(12.345).unwrap(), "1234.5");
        assert_eq!(cents_decimal(0.0).unwrap(), "0");
        // 1e-14 USD is 1e-12 cents, the smallest step Stripe takes.
        assert_eq!(cents_decimal(1e-14).unwrap(), "0.000000000001");
    }

    #[test]
    fn amounts_finer_than_twelve_decimal_places_of_a_cent_are_refused() {
        assert!(cents_decimal(1e-15).is_err());
        assert!(cents_decimal(1.234_567_891_234_5e-12).is_err());
        assert!(cents_decimal(-0.01).is_err());
        assert!(cents_decimal(f64::NAN).is_err());
        assert!(cents_decimal(f64::INFINITY).is_err());
    }

    #[test]
    fn stripes_decimals_compare_equal_to_ours() {
        assert_eq!(normalize_decimal("0.000200000000"), "0.0002");
        assert_eq!(normalize_decimal("0300.50"), "300.5");
        assert_eq!(normalize_decimal("0.000"), "0");
        assert_eq!(normalize_decimal("2900"), "2900");
        assert_eq!(cents_text(Some(0), Some("0")), "0");
        assert_eq!(cents_text(Some(2900), None), "2900");
    }

    #[test]
    fn a_free_tier_plans_nothing_and_a_paid_one_plans_both_prices() {
        let tiers = plan(&catalog(vec![
            tier("free", 0, None),
            tier("pro", 2900, Some(("pro_overage", 0.000002))),
        ]))
        .unwrap();
        assert_eq!(tiers.len(), 1);
        assert_eq!(tiers[0].product_id, "tollgate_tier_pro");
        assert_eq!(tiers[0].product_name, "Tollgate Pro");
        assert_eq!(
            tiers[0].prices[1].shape,
            PriceShape::Overage {
                meter: "tollgate_units".to_owned(),
                included: 1_000_000,
                cents_per_unit: "0.0002".to_owned()
            }
        );
    }

    #[test]
    fn an_image_overage_is_metered_on_the_images_meter() {
        let mut starter = tier("starter", 900, None);
        starter.unit_overages.push(UnitOverage {
            meter_event_name: "tollgate_images".to_owned(),
            included_units: 500,
            overage: Overage {
                lookup_key: "starter_images_overage".to_owned(),
                usd_per_unit: 0.025,
            },
        });
        let tiers = plan(&catalog(vec![starter])).unwrap();
        assert_eq!(
            tiers[0].prices[1].shape,
            PriceShape::Overage {
                meter: "tollgate_images".to_owned(),
                included: 500,
                cents_per_unit: "2.5".to_owned()
            }
        );
    }

    #[test]
    fn a_catalog_that_would_fight_over_a_lookup_key_is_refused() {
        let mut team = tier("team", 9900, None);
        team.price_lookup_key = "pro_monthly".to_owned();
        let error = plan(&catalog(vec![tier("pro", 2900, None), team])).unwrap_err();
        assert!(error.to_string().contains("pro_monthly"), "{error}");
        assert!(plan(&catalog(vec![tier("pro", 1, None), tier("pro", 2, None)])).is_err());
        assert!(plan(&catalog(vec![tier("pro plus", 1, None)])).is_err());
        let mut eur = catalog(vec![tier("pro", 2900, None)]);
        eur.currency = "eur".to_owned();
        assert!(plan(&eur).is_err());
    }

    #[test]
    fn wanted_terms_render_like_stripes_price_would() {
        let overage = PricePlan {
            tier: "pro".to_owned(),
            lookup_key: "pro_overage".to_owned(),
            shape: PriceShape::Overage {
                meter: "tollgate_units".to_owned(),
                included: 1000,
                cents_per_unit: "0.0002".to_owned(),
            },
        };
        let terms = overage.terms("tollgate_tier_pro", "usd", "mtr_1");
        assert_eq!(terms.recurring, "month metered on mtr_1");
        assert_eq!(terms.amount, "graduated: up to 1000 at 0, then at 0.0002");
    }
}
