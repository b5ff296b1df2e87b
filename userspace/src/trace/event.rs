//! A kernel TCP event as users see it: attributed to the pod (workload, identity) whose socket
//! it is and to the peer at the other end, with the socket's role in the mesh ("leg").
//! Serialized as one JSON object per line on the admin `/trace` stream; [`Event::text`] is
//! the human-readable line of `ambit trace`.

use serde::{Deserialize, Serialize};

use crate::pod::Leg;

/// The other end of the socket, as far as the mesh knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The service the connection was made to (a captured connect to a service address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The peer's own address, when the socket's remote end is the proxy standing in for it
    /// (a delivery of an inbound connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl Peer {
    fn label(&self, addr: &str) -> String {
        match (&self.namespace, &self.workload) {
            (Some(ns), Some(w)) => format!("{ns}/{w}"),
            _ => addr.to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the proxy read it (RFC 3339, UTC).
    pub time: String,
    pub node: String,
    /// connect, established, state, rtt, retransmit, close, reset.
    pub kind: String,
    /// What the socket is: `app` (the pod's own), `tunnel` (HBONE between node proxies),
    /// `upstream` (the proxy's plaintext connection out of the pod), `delivery` (the proxy
    /// handing an inbound connection to the pod), `inbound` (accepted from the network).
    pub leg: Leg,
    /// `outbound`: the socket connected; `inbound`: it was accepted.
    pub direction: String,
    pub namespace: String,
    pub pod: String,
    pub workload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub local: String,
    pub remote: String,
    /// Where a captured connect was going before the proxy took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<String>,
    pub peer: Peer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_state: Option<String>,
    pub srtt_us: u32,
    /// Segments retransmitted over the socket's life so far.
    pub retransmits: u32,
    /// `retransmit` events: segments in this retransmission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<u32>,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    pub socket_cookie: u64,
}

impl Event {
    /// `namespace/workload` of the socket's own pod.
    pub fn own(&self) -> String {
        format!("{}/{}", self.namespace, self.workload)
    }

    /// The line `ambit trace` prints: who to whom (the connecting side first), what, where.
    pub fn text(&self) -> String {
        let me = self.own();
        let peer_addr =
            self.peer.address.as_ref().or(self.original_destination.as_ref()).unwrap_or(&self.remote);
        let peer = self.peer.label(peer_addr);
        let (from, to, from_addr, to_addr) = if self.direction == "outbound" {
            (me, peer, &self.local, peer_addr)
        } else {
            (peer, me, peer_addr, &self.local)
        };
        let mut line = format!(
            "{} {} {:<11} {from} -> {to} [{}] {from_addr} -> {to_addr}",
            self.time, self.node, self.kind, self.leg
        );
        if let Some(svc) = &self.peer.service {
            line.push_str(&format!(" service={svc}"));
        }
        match self.kind.as_str() {
            "state" | "close" | "reset" => {
                if let (Some(a), Some(b)) = (&self.old_state, &self.new_state) {
                    line.push_str(&format!(" {a}->{b}"));
                }
            }
            "retransmit" => line.push_str(&format!(" segments={}", self.segments.unwrap_or(0))),
            _ => {}
        }
        if self.srtt_us > 0 {
            line.push_str(&format!(" srtt={}us", self.srtt_us));
        }
        if self.retransmits > 0 {
            line.push_str(&format!(" retransmits={}", self.retransmits));
        }
        if matches!(self.kind.as_str(), "close" | "reset") {
            line.push_str(&format!(" rx={}B acked={}B", self.bytes_received, self.bytes_acked));
        }
        line
    }
}

/// Which events a `/trace` subscriber wants; every set criterion must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// The socket's pod's namespace, or the peer's.
    pub namespace: Option<String>,
    /// `name` or `namespace/name` of the socket's workload (or pod), or the peer's.
    pub workload: Option<String>,
    /// The peer: `namespace/workload`, a workload name, an identity, or a service.
    pub peer: Option<String>,
    /// Kinds to keep (empty: all).
    pub kinds: Vec<String>,
    /// Legs to keep (empty: all).
    pub legs: Vec<String>,
}

fn names_workload(want: &str, ns: Option<&str>, workload: Option<&str>, pod: Option<&str>) -> bool {
    let matches = |name: Option<&str>| match (want.split_once('/'), name) {
        (Some((n, w)), Some(name)) => ns == Some(n) && w == name,
        (None, Some(name)) => want == name,
        (_, None) => false,
    };
    matches(workload) || matches(pod)
}

impl Filter {
    /// From a query string (`namespace=..&workload=..&peer=..&kind=a,b&leg=..`).
    pub fn from_query(query: &str) -> Filter {
        let mut f = Filter::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let list = || v.split(',').filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>();
            match k.as_ref() {
                "namespace" => f.namespace = Some(v.into_owned()),
                "workload" => f.workload = Some(v.into_owned()),
                "peer" => f.peer = Some(v.into_owned()),
                "kind" => f.kinds.extend(list()),
                "leg" => f.legs.extend(list()),
                _ => {}
            }
        }
        f
    }

    /// The query string that asks for this filter.
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [("namespace", &self.namespace), ("workload", &self.workload), ("peer", &self.peer)] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if !self.kinds.is_empty() {
            q.append_pair("kind", &self.kinds.join(","));
        }
        if !self.legs.is_empty() {
            q.append_pair("leg", &self.legs.join(","));
        }
        q.finish()
    }

    pub fn admits(&self, e: &Event) -> bool {
        let p = &e.peer;
        if let Some(ns) = &self.namespace {
            if e.namespace != *ns && p.namespace.as_deref() != Some(ns) {
                return false;
            }
        }
        if let Some(w) = &self.workload {
            let own = names_workload(w, Some(&e.namespace), Some(&e.workload), Some(&e.pod));
            let peer = names_workload(w, p.namespace.as_deref(), p.workload.as_deref(), None);
            if !own && !peer {
                return false;
            }
        }
        if let Some(want) = &self.peer {
            let by_name = names_workload(want, p.namespace.as_deref(), p.workload.as_deref(), None);
            let by_id = p.identity.as_deref() == Some(want.as_str());
            let by_service =
                p.service.as_deref().is_some_and(|s| s == want || s.ends_with(&format!("/{want}")));
            if !(by_name || by_id || by_service) {
                return false;
            }
        }
        (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && (self.legs.is_empty() || self.legs.iter().any(|l| l == e.leg.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            time: "2026-11-23T00:00:00.000000Z".into(),
            node: "n1".into(),
            kind: "connect".into(),
            leg: Leg::App,
            direction: "outbound".into(),
            namespace: "demo".into(),
            pod: "a-5d9f".into(),
            workload: "a".into(),
            identity: Some("spiffe://cluster.local/ns/demo/sa/client".into()),
            local: "10.1.0.2:40000".into(),
            remote: "127.0.0.1:15001".into(),
            original_destination: Some("10.96.0.10:80".into()),
            peer: Peer {
                namespace: Some("demo".into()),
                workload: Some("b".into()),
                identity: Some("spiffe://cluster.local/ns/demo/sa/server".into()),
                service: Some("demo/web.demo.svc.cluster.local".into()),
                address: None,
            },
            old_state: None,
            new_state: None,
            srtt_us: 0,
            retransmits: 0,
            segments: None,
            bytes_received: 0,
            bytes_acked: 0,
            socket_cookie: 7,
        }
    }

    #[test]
    fn filters_match_either_end_and_every_criterion_must_hold() {
        let e = event();
        let f = |q: &str| Filter::from_query(q).admits(&e);
        assert!(f(""));
        assert!(f("namespace=demo") && !f("namespace=other"));
        assert!(f("workload=a") && f("workload=demo/a") && f("workload=a-5d9f") && f("workload=b"));
        assert!(!f("workload=other/a") && !f("workload=c"));
        assert!(
            f("peer=demo/b")
                && f("peer=spiffe://cluster.local/ns/demo/sa/server")
                && f("peer=web.demo.svc.cluster.local")
        );
        assert!(!f("peer=demo/a"), "the peer filter looks at the peer only");
        assert!(f("kind=close,connect") && !f("kind=close"));
        assert!(f("leg=app") && !f("leg=tunnel"));
        assert!(!f("namespace=demo&kind=rtt"));
        let q = Filter::from_query("namespace=demo&kind=connect,close&peer=demo%2Fb");
        assert_eq!(Filter::from_query(&q.to_query()), q);
    }

    #[test]
    fn the_text_line_reads_from_the_connecting_side() {
        let out = event().text();
        assert!(out.contains("connect     demo/a -> demo/b [app] 10.1.0.2:40000 -> 10.96.0.10:80"), "{out}");
        let mut inbound = event();
        inbound.direction = "inbound".into();
        inbound.kind = "close".into();
        inbound.old_state = Some("LAST_ACK".into());
        inbound.new_state = Some("CLOSE".into());
        let out = inbound.text();
        assert!(out.contains("demo/b -> demo/a"), "{out}");
        assert!(out.contains("LAST_ACK->CLOSE") && out.contains("rx=0B"), "{out}");
    }
}
