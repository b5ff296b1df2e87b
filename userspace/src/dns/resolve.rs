//! Which names the mesh answers for a pod, and with what: a service's hostname and the short
//! forms Kubernetes' search path makes of it, and ServiceEntry hostnames with the addresses
//! the control plane gave them. Everything else is the pod's own resolver's to answer.

use std::net::IpAddr;

/// What the mesh says of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    /// A mesh name, with its addresses (of either family: the answer keeps those of the type
    /// asked, and a known name without them is NOERROR with no records, not NXDOMAIN).
    Addresses(Vec<IpAddr>),
    /// Not a mesh name: forwarded.
    Forward,
}

/// The hostnames `name`, asked by a pod of `namespace`, may stand for, most specific first:
/// - the name as asked (`web.demo.svc.cluster.local`, `api.example.com`);
/// - with one of the pod's search domains taken off, for resolvers that try the search list
///   first (`ndots:5` makes `api.example.com.demo.svc.cluster.local` the first name asked);
/// - Kubernetes' short forms completed: `web` (the pod's namespace), `web.demo`,
///   `web.demo.svc`.
pub fn candidates(name: &str, namespace: &str, domain: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    for search in [format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain.to_string()] {
        if let Some(stem) = name.strip_suffix(&search).and_then(|s| s.strip_suffix('.')) {
            if !stem.is_empty() {
                out.push(stem.to_string());
            }
        }
    }
    match name.split('.').count() {
        1 => out.push(format!("{name}.{namespace}.svc.{domain}")),
        2 => out.push(format!("{name}.svc.{domain}")),
        3 if name.ends_with(".svc") => out.push(format!("{name}.{domain}")),
        _ => {}
    }
    out.dedup();
    out
}

/// Answers `name` from `lookup` (hostname → addresses, `None` when the mesh has no such
/// host), trying [`candidates`] in order.
pub fn resolve(
    name: &str,
    namespace: &str,
    domain: &str,
    lookup: impl Fn(&str) -> Option<Vec<IpAddr>>,
) -> Known {
    candidates(name, namespace, domain)
        .iter()
        .find_map(|c| lookup(c))
        .map_or(Known::Forward, Known::Addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "cluster.local";

    fn mesh(host: &str) -> Option<Vec<IpAddr>> {
        match host {
            "web.demo.svc.cluster.local" => Some(vec!["10.96.0.10".parse().expect("ip")]),
            "api.example.com" => Some(vec!["240.240.0.1".parse().expect("ip")]),
            "v6only.demo.svc.cluster.local" => Some(vec!["fd00::10".parse().expect("ip")]),
            _ => None,
        }
    }

    fn ask(name: &str, ns: &str) -> Known {
        resolve(name, ns, DOMAIN, mesh)
    }

    #[test]
    fn a_service_answers_to_its_search_path_forms() {
        let web = Known::Addresses(vec!["10.96.0.10".parse().expect("ip")]);
        for name in ["web.demo.svc.cluster.local", "web.demo.svc", "web.demo"] {
            assert_eq!(ask(name, "other"), web, "{name}");
        }
        assert_eq!(ask("web", "demo"), web, "the short name in the pod's own namespace");
        assert_eq!(ask("web", "other"), Known::Forward, "in another namespace it is not this service");
    }

    #[test]
    fn a_search_domain_added_before_an_external_name_is_taken_off() {
        let api = Known::Addresses(vec!["240.240.0.1".parse().expect("ip")]);
        assert_eq!(ask("api.example.com", "demo"), api);
        for tried in [
            "api.example.com.demo.svc.cluster.local",
            "api.example.com.svc.cluster.local",
            "api.example.com.cluster.local",
        ] {
            assert_eq!(ask(tried, "demo"), api, "{tried}");
        }
        // Another namespace's search domain is not this pod's.
        assert_eq!(ask("api.example.com.other.svc.cluster.local", "demo"), Known::Forward);
    }

    #[test]
    fn names_the_mesh_does_not_have_are_forwarded() {
        for name in ["example.org", "db.demo.svc.cluster.local", "cluster.local", "svc.cluster.local", "demo"]
        {
            assert_eq!(ask(name, "demo"), Known::Forward, "{name}");
        }
    }

    #[test]
    fn the_name_as_asked_comes_first() {
        assert_eq!(candidates("web", "demo", DOMAIN), ["web", "web.demo.svc.cluster.local"]);
        assert_eq!(
            candidates("a.b.demo.svc.cluster.local", "demo", DOMAIN),
            ["a.b.demo.svc.cluster.local", "a.b", "a.b.demo", "a.b.demo.svc"]
        );
    }
}
