//! Checks of a parsed mesh file, each error pointing at the line and field to fix.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
};

use super::{
    locate::{self, FieldPath},
    model::{MeshFile, PodStatus},
    BadValue, Checks, Mesh, MeshFileError, PodSpec, ServicePortSpec, ServiceSpec,
};

pub(super) struct Validator<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub checks: &'a Checks<'a>,
}

impl Validator<'_> {
    /// `message`: a [`BadValue`], or text for what no value alone explains.
    pub(super) fn err(&self, field: FieldPath, message: impl std::fmt::Display) -> MeshFileError {
        MeshFileError {
            file: self.path.to_path_buf(),
            location: locate::locate_nearest(self.text, &field),
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    pub fn validate(&self, file: MeshFile) -> Result<Mesh, MeshFileError> {
        let mut mesh = Mesh::default();
        check_dns_label(&file.root_namespace)
            .map_err(|m| self.err(FieldPath::default().key("rootNamespace"), m))?;
        mesh.root_namespace = file.root_namespace.clone();
        for (i, ns) in file.namespaces.into_iter().enumerate() {
            let at = FieldPath::default().key("namespaces").index(i);
            check_dns_label(&ns.name).map_err(|m| self.err(at.clone().key("name"), m))?;
            self.check_labels(&ns.labels, at.clone().key("labels"))?;
            if mesh.namespaces.contains_key(&ns.name) {
                return Err(self.err(at.key("name"), format!("namespace {:?} is declared twice", ns.name)));
            }
            mesh.namespaces.insert(ns.name.clone(), ns);
        }

        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
        for (i, pod) in file.pods.into_iter().enumerate() {
            let at = FieldPath::default().key("pods").index(i);
            check_dns_subdomain(&pod.name).map_err(|m| self.err(at.clone().key("name"), m))?;
            if !mesh.namespaces.contains_key(&pod.namespace) {
                return Err(self.err(
                    at.key("namespace"),
                    format!("namespace {:?} is not declared under `namespaces`", pod.namespace),
                ));
            }
            self.check_labels(&pod.labels, at.clone().key("labels"))?;
            check_dns_subdomain(&pod.service_account)
                .map_err(|m| self.err(at.clone().key("serviceAccount"), m))?;
            let key = format!("{}/{}", pod.namespace, pod.name);
            if let Some(first) = by_key.insert(key.clone(), i) {
                return Err(self
                    .err(at.key("name"), format!("duplicate pod {key} (first declared as pods[{first}])")));
            }
            if pod.ips.is_empty() {
                return Err(self.err(at.key("ips"), "a pod needs at least one IP address"));
            }
            let mut ips = Vec::with_capacity(pod.ips.len());
            for (j, text) in pod.ips.iter().enumerate() {
                let ip_at = at.clone().key("ips").index(j);
                // IPv4-mapped IPv6 is the IPv4 address itself: `::ffff:10.1.0.9` and
                // `10.1.0.9` are one pod address, and `::ffff:127.0.0.1` is loopback.
                let ip: IpAddr = crate::capture::addr::canonical(text.parse().map_err(|_| {
                    self.err(ip_at.clone(), format!("{text:?} is not an IPv4 or IPv6 address"))
                })?);
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                    return Err(self.err(ip_at, format!("{ip} cannot be a pod address")));
                }
                if let Some(other) = by_ip.insert(ip, i) {
                    return Err(self.err(ip_at, format!("{ip} is already the address of pods[{other}]")));
                }
                ips.push(ip);
            }
            if pod.interface.is_empty() || pod.interface.len() > 15 || pod.interface.contains('/') {
                return Err(
                    self.err(at.key("interface"), format!("{:?} is not an interface name", pod.interface))
                );
            }
            let local = self.checks.node.is_some_and(|me| pod.node.as_deref().is_none_or(|n| n == me));
            if local {
                check_netns(&pod.netns).map_err(|m| self.err(at.clone().key("netns"), m))?;
            }
            mesh.pods.push(PodSpec {
                name: pod.name,
                namespace: pod.namespace,
                labels: pod.labels,
                service_account: pod.service_account,
                ips,
                netns: pod.netns,
                node: pod.node,
                interface: pod.interface,
                healthy: pod.status == PodStatus::Healthy,
            });
        }
        self.services(&mut mesh, file.services, &by_ip)?;
        self.policies(&mut mesh, file.policies)?;
        Ok(mesh)
    }

    fn services(
        &self,
        mesh: &mut Mesh,
        services: Vec<super::model::Service>,
        pod_ips: &HashMap<IpAddr, usize>,
    ) -> Result<(), MeshFileError> {
        let mut keys: HashMap<String, usize> = HashMap::new();
        let mut vips: HashMap<IpAddr, usize> = HashMap::new();
        for (i, svc) in services.into_iter().enumerate() {
            let at = FieldPath::default().key("services").index(i);
            check_dns_label(&svc.name).map_err(|m| self.err(at.clone().key("name"), m))?;
            if !mesh.namespaces.contains_key(&svc.namespace) {
                return Err(self.err(
                    at.key("namespace"),
                    format!("namespace {:?} is not declared under `namespaces`", svc.namespace),
                ));
            }
            let hostname = svc
                .hostname
                .clone()
                .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", svc.name, svc.namespace));
            check_dns_subdomain(&hostname).map_err(|m| self.err(at.clone().key("hostname"), m))?;
            let key = format!("{}/{}", svc.namespace, hostname);
            if let Some(first) = keys.insert(key.clone(), i) {
                return Err(self.err(
                    at.key("name"),
                    format!("duplicate service {key} (first declared as services[{first}])"),
                ));
            }
            let mut addresses = Vec::new();
            for (j, text) in svc.addresses.iter().enumerate() {
                let ip_at = at.clone().key("addresses").index(j);
                let ip: IpAddr = crate::capture::addr::canonical(text.parse().map_err(|_| {
                    self.err(ip_at.clone(), format!("{text:?} is not an IPv4 or IPv6 address"))
                })?);
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                    return Err(self.err(ip_at, format!("{ip} cannot be a service address")));
                }
                if let Some(p) = pod_ips.get(&ip) {
                    return Err(self.err(ip_at, format!("{ip} is already the address of pods[{p}]")));
                }
                if let Some(other) = vips.insert(ip, i) {
                    return Err(self.err(ip_at, format!("{ip} is already the address of services[{other}]")));
                }
                addresses.push(ip);
            }
            if svc.ports.is_empty() {
                return Err(self.err(at.key("ports"), "a service needs at least one port"));
            }
            let mut ports: Vec<ServicePortSpec> = Vec::new();
            for (j, p) in svc.ports.iter().enumerate() {
                let p_at = at.clone().key("ports").index(j);
                if p.port == 0 {
                    return Err(self.err(p_at.key("port"), "ports are 1 to 65535"));
                }
                if p.target_port == Some(0) {
                    return Err(self.err(p_at.key("targetPort"), "ports are 1 to 65535"));
                }
                if ports.iter().any(|q| q.port == p.port) {
                    return Err(self.err(p_at.key("port"), format!("port {} is listed twice", p.port)));
                }
                ports.push(ServicePortSpec { port: p.port, target_port: p.target_port.unwrap_or(p.port) });
            }
            self.check_labels(&svc.selector, at.clone().key("selector"))?;
            mesh.services.push(ServiceSpec {
                name: svc.name,
                namespace: svc.namespace,
                hostname,
                addresses,
                ports,
                selector: svc.selector,
            });
        }
        Ok(())
    }

    pub(super) fn check_labels(
        &self,
        labels: &BTreeMap<String, String>,
        at: FieldPath,
    ) -> Result<(), MeshFileError> {
        for (k, v) in labels {
            let ok_key = !k.is_empty() && k.len() <= 317 && !k.chars().any(char::is_whitespace);
            if !ok_key || v.len() > 63 || v.chars().any(char::is_whitespace) {
                return Err(self.err(at.clone().key(k), format!("invalid label {k:?}: {v:?}")));
            }
        }
        Ok(())
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
pub(super) fn check_dns_label(name: &str) -> Result<(), BadValue> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(BadValue::NotADnsLabel(name.to_string()))
    }
}

/// RFC 1123 subdomain, as Kubernetes requires of pod and service account names.
pub(super) fn check_dns_subdomain(name: &str) -> Result<(), BadValue> {
    let ok = !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| check_dns_label(l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(BadValue::NotADnsSubdomain(name.to_string()))
    }
}

/// The path must name a network namespace that exists now.
fn check_netns(path: &Path) -> Result<(), BadValue> {
    if !path.is_absolute() {
        return Err(BadValue::RelativePath(path.to_path_buf()));
    }
    match crate::os::netns::is_network_namespace(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(BadValue::NotANetns(path.to_path_buf())),
        Err(source) => Err(BadValue::NoNetns { path: path.to_path_buf(), source }),
    }
}
