//! The enrolled pods by network namespace cookie: how kernel events, which carry only the
//! cookie, find the pod (and its workload and identity) they belong to.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::PodCtx;
use crate::os::cookie::NetnsCookie;

#[derive(Default)]
pub struct PodRegistry(RwLock<HashMap<NetnsCookie, Arc<PodCtx>>>);

impl PodRegistry {
    pub fn insert(&self, netns_cookie: NetnsCookie, pod: Arc<PodCtx>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(netns_cookie, pod);
    }

    pub fn remove(&self, netns_cookie: NetnsCookie) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(&netns_cookie);
    }

    pub fn get(&self, netns_cookie: NetnsCookie) -> Option<Arc<PodCtx>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(&netns_cookie).cloned()
    }
}
