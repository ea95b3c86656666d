//! The models the gateway serves, each resolved from config once at start:
//! the backends serving it, the admission queue of its pool, the encoding
//! its tokens are counted with, its own unit size and its metric label. A
//! request looks its model up here once; every later phase reads the route.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_backends::protocol::Protocol;
use tollgate_backends::routing::BackendId;
use tollgate_metering::tokens::Encoding;

use super::metrics::{ModelLabel, RequestMetrics};
use crate::admission::AdmissionQueues;
use crate::admission::queue::AdmissionQueue;
use crate::config::Config;
use crate::metering::request::Metering;

/// One served model, as every phase of a request needs it.
pub struct ModelRoute {
    pub name: String,
    /// The backends serving the model, by id (their index in config order).
    pub backends: Vec<BackendId>,
    /// The admission queue of the model's pool.
    pub queue: Arc<AdmissionQueue>,
    pub encoding: Encoding,
    /// `[metering] tokens_per_unit` for this model, which wins over the tier's.
    pub tokens_per_unit: Option<u64>,
    /// A Triton backend serves it: Triton reports no usage, so the prompt
    /// is counted before forwarding, for the usage its answer is given.
    pub counts_prompt_first: bool,
    pub label: ModelLabel,
}

/// Every served model, in config order, and an index by name.
pub struct ModelRoutes {
    ordered: Vec<Arc<ModelRoute>>,
    by_name: HashMap<String, Arc<ModelRoute>>,
}

impl ModelRoutes {
    pub fn new(
        config: &Config,
        queues: &AdmissionQueues,
        metering: &Metering,
        metrics: &RequestMetrics,
    ) -> Self {
        let ordered: Vec<Arc<ModelRoute>> = config
            .models()
            .into_iter()
            .filter_map(|model| {
                let backends: Vec<BackendId> = config
                    .backends
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.models.iter().any(|m| m == model))
                    .map(|(id, _)| id)
                    .collect();
                // Config validation puts a model's backends in one pool.
                let pool = &config.backends[*backends.first()?].pool;
                let counts_prompt_first = backends
                    .iter()
                    .any(|&id| config.backends[id].protocol == Protocol::Triton);
                Some(Arc::new(ModelRoute {
                    name: model.to_owned(),
                    queue: Arc::clone(queues.for_pool(pool)?),
                    backends,
                    encoding: metering.encoding_for(model),
                    tokens_per_unit: config.metering.tokens_per_unit.get(model).copied(),
                    counts_prompt_first,
                    label: metrics.model_label(model),
                }))
            })
            .collect();
        let by_name = ordered
            .iter()
            .map(|route| (route.name.clone(), Arc::clone(route)))
            .collect();
        Self { ordered, by_name }
    }

    pub fn get(&self, model: &str) -> Option<&Arc<ModelRoute>> {
        self.by_name.get(model)
    }

    /// Every served model's name, in config order (the model list).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ordered.iter().map(|route| route.name.as_str())
    }
}
