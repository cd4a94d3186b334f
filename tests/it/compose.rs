//! The deployment files checked for structure, without Docker: the
//! `Dockerfile`, `docker-compose.yml`, the Prometheus configuration and the
//! Grafana provisioning and dashboard under `deploy/`.
//!
//! Nothing here needs Redis, PostgreSQL or a Docker engine. The one check
//! that needs the `docker compose` CLI is skipped, with a note, where it is
//! absent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use seckill::config::Settings;
use serde_yaml::{Mapping, Value};

/// Every service of the production-like topology.
const EXPECTED_SERVICES: &[&str] = &[
    "redis",
    "postgres",
    "migrate",
    "gateway-1",
    "gateway-2",
    "worker",
    "nginx",
    "prometheus",
    "grafana",
];

/// The services that run our image, and the `seckill` command line of each.
const SECKILL_SERVICES: &[(&str, &[&str])] = &[
    ("migrate", &["migrate"]),
    ("gateway-1", &["serve", "--no-workers"]),
    ("gateway-2", &["serve", "--no-workers"]),
    ("worker", &["worker"]),
];

/// Every metric seckill records, histograms without their `_bucket`, `_sum`
/// and `_count` suffixes. The dashboard must use exactly these, and src/
/// must still record each of them.
const KNOWN_METRICS: &[&str] = &[
    "seckill_http_requests_total",
    "seckill_http_request_seconds",
    "seckill_purchases_total",
    "seckill_lua_seconds",
    "seckill_cache_requests_total",
    "seckill_stream_length",
    "seckill_stream_pending",
    "seckill_worker_batch_size",
    "seckill_db_write_seconds",
    "seckill_orders_persisted_total",
    "seckill_orders_acknowledged_total",
    "seckill_orders_claimed_total",
    "seckill_orders_expired_total",
    "seckill_units_returned_total",
    "seckill_reconcile_drift",
    "seckill_rate_limited_total",
    "seckill_tokens_issued_total",
];

/// Values for the variables docker-compose.yml interpolates, as an operator's
/// `.env` would give them.
const SAMPLE_ENV: &[(&str, &str)] = &[
    ("POSTGRES_PASSWORD", "pg-password-from-env"),
    ("SECKILL_JWT_SECRET", "jwt-secret-from-env"),
    ("SECKILL_ADMIN_TOKEN", "admin-token-from-env"),
];

// ------------------------------------------------------------------ helpers --

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn yaml(relative: &str) -> Value {
    let mut value: Value = serde_yaml::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{relative}: bad `<<` merge key: {e}"));
    value
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn services(compose: &Value) -> &Mapping {
    compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has a `services` mapping")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    services(compose)
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

fn service_names(compose: &Value) -> BTreeSet<String> {
    services(compose)
        .keys()
        .map(|k| k.as_str().expect("service names are strings").to_string())
        .collect()
}

/// A scalar as a string (compose accepts numbers where it means strings).
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of strings, or one string split on whitespace (compose's two forms
/// of `command`).
fn words(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|v| scalar(v).expect("list items are scalars"))
            .collect(),
        other => scalar(other)
            .expect("a string or a list")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    }
}

/// A service's `environment`, in either of compose's forms.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let key = k.as_str().expect("variable names are strings").to_string();
                (key, scalar(v).unwrap_or_default())
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let item = item.as_str().expect("KEY=VALUE strings");
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Some(other) => panic!("unexpected environment form: {other:?}"),
    }
}

/// One entry of a service's `volumes`, in either syntax.
struct Mount {
    /// `./…`, `/…`: a host path; anything else names a volume.
    source: String,
    target: String,
}

impl Mount {
    fn is_bind(&self) -> bool {
        self.source.starts_with('.') || self.source.starts_with('/') || self.source.starts_with('~')
    }
}

fn mounts(service: &Value) -> Vec<Mount> {
    let Some(volumes) = service.get("volumes").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    volumes
        .iter()
        .filter_map(|entry| match entry {
            Value::String(short) => {
                // A bare path (no `:`) is an anonymous volume: nothing to
                // declare or to check.
                let mut parts = short.splitn(3, ':');
                let source = parts.next().unwrap_or_default().to_string();
                parts.next().map(|target| Mount {
                    source,
                    target: target.to_string(),
                })
            }
            Value::Mapping(_) => {
                let source = entry.get("source").and_then(scalar)?;
                let target = entry.get("target").and_then(scalar).unwrap_or_default();
                Some(Mount { source, target })
            }
            other => panic!("unexpected volume entry: {other:?}"),
        })
        .collect()
}

/// The names a service depends on, with the condition of each.
fn depends_on(service: &Value) -> Vec<(String, String)> {
    match service.get("depends_on") {
        None => Vec::new(),
        Some(Value::Sequence(names)) => names
            .iter()
            .map(|n| (scalar(n).unwrap(), "service_started".to_string()))
            .collect(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(name, spec)| {
                let condition = spec
                    .get("condition")
                    .and_then(scalar)
                    .unwrap_or_else(|| "service_started".into());
                (scalar(name).unwrap(), condition)
            })
            .collect(),
        Some(other) => panic!("unexpected depends_on form: {other:?}"),
    }
}

/// One published port: the host port (`None`: Docker picks one), the
/// container port and the protocol.
struct Port {
    published: Option<String>,
    target: String,
    protocol: String,
}

fn ports(service: &Value) -> Vec<Port> {
    let Some(ports) = service.get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|port| match port {
            Value::Mapping(_) => Port {
                published: port.get("published").and_then(scalar),
                target: port.get("target").and_then(scalar).unwrap_or_default(),
                protocol: port
                    .get("protocol")
                    .and_then(scalar)
                    .unwrap_or_else(|| "tcp".into()),
            },
            short => {
                let short = scalar(short).expect("a port string");
                let (spec, protocol) = short.split_once('/').unwrap_or((&short, "tcp"));
                // [ip:][host:]container, the IP possibly IPv6 in brackets.
                let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                Port {
                    published: parts.get(1).map(|p| p.to_string()),
                    target: parts[0].to_string(),
                    protocol: protocol.to_string(),
                }
            }
        })
        .collect()
}

/// The arguments of every `directive` in an nginx file, comments dropped.
fn nginx_directives(text: &str, directive: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter_map(|line| line.strip_prefix(directive))
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .map(|rest| rest.trim().trim_end_matches(';').trim().to_string())
        .collect()
}

/// The tag of an image reference, if it has one (`None` for a digest).
fn image_tag(image: &str) -> Option<&str> {
    if image.contains("@sha256:") {
        return None;
    }
    let name = image.rsplit('/').next().unwrap_or(image);
    name.split_once(':').map(|(_, tag)| tag)
}

fn is_pinned(image: &str) -> bool {
    if image.contains("@sha256:") {
        return true;
    }
    matches!(image_tag(image), Some(tag) if !tag.is_empty() && tag != "latest" && !tag.contains('$'))
}

/// Compose's variable interpolation: `$$`, `${X}`, `${X:-default}`,
/// `${X-default}`, `${X:?message}` and `${X?message}`.
fn interpolate(text: &str, vars: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(body) = rest.strip_prefix('{') else {
            return Err(format!("unbraced variable in `{text}`"));
        };
        let end = body
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in `{text}`"))?;
        let expr = &body[..end];
        rest = &body[end + 1..];
        let name_len = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_len);
        let value = vars.get(name).copied();
        let set = value.is_some_and(|v| !v.is_empty());
        let resolved = if let Some(default) = op.strip_prefix(":-") {
            if set { value.unwrap() } else { default }
        } else if let Some(default) = op.strip_prefix('-') {
            value.unwrap_or(default)
        } else if let Some(message) = op.strip_prefix(":?") {
            value
                .filter(|_| set)
                .ok_or_else(|| format!("{name} is required: {message}"))?
        } else if let Some(message) = op.strip_prefix('?') {
            value.ok_or_else(|| format!("{name} is required: {message}"))?
        } else if op.is_empty() {
            value.unwrap_or("")
        } else {
            return Err(format!("unsupported interpolation `${{{expr}}}`"));
        };
        out.push_str(resolved);
    }
    out.push_str(rest);
    Ok(out)
}

fn sample_vars() -> BTreeMap<&'static str, &'static str> {
    SAMPLE_ENV.iter().copied().collect()
}

/// The Dockerfile as instructions (keyword upper-cased, arguments with line
/// continuations joined), comments and blank lines dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (keyword, args) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        out.push((keyword.to_ascii_uppercase(), args.trim().to_string()));
        pending.clear();
    }
    out
}

/// The variables the Dockerfile's final stage sets with `ENV`.
fn dockerfile_env() -> BTreeMap<String, String> {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("the Dockerfile has a FROM");
    instructions[last_from..]
        .iter()
        .filter(|(k, _)| k == "ENV")
        .flat_map(|(_, args)| {
            args.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every `seckill_…` metric name an expression uses, suffixes stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut from = 0;
    while let Some(at) = expr[from..].find("seckill_") {
        let start = from + at;
        let word_start = start == 0 || {
            let before = bytes[start - 1];
            !(before.is_ascii_alphanumeric() || before == b'_')
        };
        let len = expr[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(expr.len() - start);
        if word_start {
            let name = &expr[start..start + len];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        from = start + len.max(1);
    }
    names
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/dashboards/seckill.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/dashboards/seckill.json is not JSON: {e}"))
}

/// The dashboard's panels, rows' nested panels included, rows themselves not.
fn dashboard_panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    let top = dashboard["panels"].as_array().expect("`panels` is a list");
    for panel in top {
        if panel["type"] == "row" {
            if let Some(nested) = panel["panels"].as_array() {
                out.extend(nested);
            }
        } else {
            out.push(panel);
        }
    }
    out
}

fn provisioned_datasource() -> Value {
    let provisioning = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let sources = provisioning["datasources"]
        .as_sequence()
        .expect("`datasources` is a list");
    sources
        .iter()
        .find(|s| s["type"].as_str() == Some("prometheus"))
        .expect("a prometheus datasource is provisioned")
        .clone()
}

/// `host:port` → (host, port).
fn host_port(target: &str) -> (&str, u16) {
    let (host, port) = target
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("`{target}` has no port"));
    (host, port.parse().expect("a numeric port"))
}

// -------------------------------------------------------------------- tests --

#[test]
fn compose_defines_every_service_of_the_topology() {
    let compose = compose();
    let names = service_names(&compose);
    for expected in EXPECTED_SERVICES {
        assert!(
            names.contains(*expected),
            "service `{expected}` is missing from docker-compose.yml: {names:?}"
        );
    }
}

#[test]
fn every_compose_image_is_pinned_to_a_version_tag_or_built_from_this_repository() {
    let compose = compose();
    for (name, service) in services(&compose) {
        let name = name.as_str().unwrap();
        if service.get("build").is_some() {
            continue;
        }
        let image = service
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("service `{name}` has neither `image` nor `build`"));
        assert!(
            is_pinned(image),
            "service `{name}` uses `{image}`: pin a version tag (never `latest`)"
        );
    }
}

#[test]
fn every_bind_mounted_host_path_exists_in_the_repository() {
    let compose = compose();
    let mut checked = 0;
    for (name, service) in services(&compose) {
        for mount in mounts(service).into_iter().filter(Mount::is_bind) {
            assert!(
                mount.source.starts_with("./"),
                "service `{}` mounts `{}`: bind mounts must be repository paths (./…)",
                name.as_str().unwrap(),
                mount.source
            );
            let path = repo().join(&mount.source);
            assert!(
                path.exists(),
                "service `{}` mounts `{}` at {}, which does not exist",
                name.as_str().unwrap(),
                mount.source,
                mount.target
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "expected configuration bind mounts (nginx, prometheus, grafana)"
    );
}

#[test]
fn every_named_volume_is_declared_and_every_declared_volume_is_used() {
    let compose = compose();
    let declared: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    let mut used = BTreeSet::new();
    for (name, service) in services(&compose) {
        for mount in mounts(service).into_iter().filter(|m| !m.is_bind()) {
            assert!(
                declared.contains(&mount.source),
                "service `{}` uses volume `{}`, which is not declared under `volumes:`",
                name.as_str().unwrap(),
                mount.source
            );
            used.insert(mount.source);
        }
    }
    assert_eq!(used, declared, "declared volumes that no service uses");
    for stateful in ["redis", "postgres"] {
        assert!(
            mounts(service(&compose, stateful))
                .iter()
                .any(|m| !m.is_bind()),
            "`{stateful}` must keep its data in a named volume"
        );
    }
}

#[test]
fn depends_on_names_existing_services_with_conditions_they_can_meet() {
    let compose = compose();
    let names = service_names(&compose);
    for (name, service) in services(&compose) {
        let name = name.as_str().unwrap();
        for (dependency, condition) in depends_on(service) {
            assert!(
                names.contains(&dependency),
                "`{name}` depends on `{dependency}`, which is not a service"
            );
            let target = self::service(&compose, &dependency);
            match condition.as_str() {
                "service_started" => {}
                "service_healthy" => assert!(
                    target.get("healthcheck").is_some(),
                    "`{name}` waits for `{dependency}` to be healthy, but it has no healthcheck"
                ),
                "service_completed_successfully" => {
                    let restart = target.get("restart").and_then(scalar);
                    assert!(
                        matches!(restart.as_deref(), None | Some("no")),
                        "`{name}` waits for `{dependency}` to complete, but it restarts ({restart:?})"
                    );
                }
                other => panic!("`{name}` → `{dependency}`: unknown condition `{other}`"),
            }
        }
    }
    // The start-up order the topology relies on.
    let waits_for = |name: &str, dependency: &str, condition: &str| {
        assert!(
            depends_on(service(&compose, name))
                .iter()
                .any(|(d, c)| d == dependency && c == condition),
            "`{name}` must wait for `{dependency}` ({condition})"
        );
    };
    waits_for("migrate", "postgres", "service_healthy");
    for seckill in ["gateway-1", "gateway-2", "worker"] {
        waits_for(seckill, "migrate", "service_completed_successfully");
        waits_for(seckill, "redis", "service_healthy");
    }
}

#[test]
fn published_host_ports_are_unique() {
    let compose = compose();
    let mut seen: BTreeMap<(u16, String), String> = BTreeMap::new();
    for (name, service) in services(&compose) {
        let name = name.as_str().unwrap().to_string();
        for port in ports(service) {
            // Only a container port: Docker picks a free host port.
            let Some(published) = port.published else {
                continue;
            };
            let host_port: u16 = published
                .parse()
                .unwrap_or_else(|_| panic!("`{name}` publishes `{published}`: not a port"));
            let key = (host_port, port.protocol.clone());
            if let Some(other) = seen.insert(key, name.clone()) {
                panic!(
                    "host port {host_port}/{} is published by `{other}` and `{name}`",
                    port.protocol
                );
            }
        }
    }
    assert!(
        seen.values().any(|s| s == "nginx"),
        "nginx must publish the entry port"
    );
}

#[test]
fn nginx_publishes_its_listen_port_and_proxies_to_the_compose_gateways() {
    let compose = compose();
    let nginx = service(&compose, "nginx");
    let mounted: BTreeMap<String, String> = mounts(nginx)
        .into_iter()
        .filter(Mount::is_bind)
        .map(|m| (m.target, m.source))
        .collect();
    let host_file = |container_path: &str| {
        mounted
            .get(container_path)
            .unwrap_or_else(|| panic!("nginx has nothing mounted at {container_path}"))
            .clone()
    };

    // Follow the includes from the main file: each must be mounted where
    // nginx looks for it (relative paths are relative to /etc/nginx).
    let mut files = vec!["/etc/nginx/nginx.conf".to_string()];
    let mut seen = BTreeSet::new();
    let mut listens = Vec::new();
    let mut upstream_servers = Vec::new();
    while let Some(path) = files.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let text = read(&host_file(&path));
        for include in nginx_directives(&text, "include") {
            let included = if include.starts_with('/') {
                include
            } else {
                format!("/etc/nginx/{include}")
            };
            // Lua modules are not in the nginx:alpine image: the compose
            // deployment uses nginx.conf, never nginx-lua.conf.
            assert!(
                !included.contains("lua"),
                "the compose nginx cannot load `{included}` (no Lua module in the image)"
            );
            files.push(included);
        }
        listens.extend(nginx_directives(&text, "listen"));
        if path.ends_with("/upstreams.conf") {
            upstream_servers.extend(nginx_directives(&text, "server"));
        }
    }

    let listen_ports: BTreeSet<String> = listens
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .map(|addr| addr.rsplit(':').next().unwrap().to_string())
        .collect();
    assert!(
        !listen_ports.is_empty(),
        "nginx's configuration has no `listen`"
    );
    let published = ports(nginx);
    assert!(!published.is_empty(), "nginx publishes no port");
    for port in published {
        assert!(
            listen_ports.contains(&port.target),
            "nginx publishes container port {} but listens on {listen_ports:?}",
            port.target
        );
    }

    let listen_port = host_port(&dockerfile_env()["SECKILL_LISTEN"]).1;
    let mut upstream_hosts = BTreeSet::new();
    for server in &upstream_servers {
        let address = server.split_whitespace().next().unwrap();
        let (host, port) = host_port(address);
        let command = SECKILL_SERVICES
            .iter()
            .find(|(name, _)| *name == host)
            .map(|(_, command)| command)
            .unwrap_or_else(|| panic!("upstream `{address}` is not a seckill service"));
        assert_eq!(command[0], "serve", "upstream `{host}` runs no gateway");
        assert_eq!(
            port, listen_port,
            "upstream `{address}`: seckill listens on {listen_port}"
        );
        upstream_hosts.insert(host.to_string());
    }
    for (name, command) in SECKILL_SERVICES {
        if command[0] == "serve" {
            assert!(
                upstream_hosts.contains(*name),
                "nginx's upstreams do not list `{name}`"
            );
        }
    }
}

#[test]
fn seckill_services_build_this_repository_and_run_commands_its_cli_accepts() {
    let compose = compose();
    assert!(
        repo().join("Dockerfile").is_file(),
        "the Dockerfile is missing"
    );
    let mut images = BTreeSet::new();
    for (name, command) in SECKILL_SERVICES {
        let service = service(&compose, name);
        let context = match service.get("build") {
            Some(Value::String(context)) => context.clone(),
            Some(build @ Value::Mapping(_)) => {
                let dockerfile = build.get("dockerfile").and_then(scalar);
                assert!(
                    matches!(dockerfile.as_deref(), None | Some("Dockerfile")),
                    "`{name}` must build ./Dockerfile"
                );
                build
                    .get("context")
                    .and_then(scalar)
                    .unwrap_or_else(|| ".".into())
            }
            other => panic!("`{name}` must `build: .`, found {other:?}"),
        };
        assert!(
            context == "." || context == "./",
            "`{name}` builds `{context}`, not the repository"
        );
        images.insert(service.get("image").and_then(scalar));

        let actual = words(
            service
                .get("command")
                .unwrap_or_else(|| panic!("`{name}` has no command")),
        );
        assert_eq!(actual, *command, "`{name}` runs the wrong command");
        // clap parses the whole command line before anything else runs, so
        // `--help` proves the subcommand and its flags exist.
        let out = Command::new(env!("CARGO_BIN_EXE_seckill"))
            .args(&actual)
            .arg("--help")
            .output()
            .expect("run the seckill binary");
        assert!(
            out.status.success(),
            "`seckill {}` (service `{name}`) is not a valid command line: {}",
            actual.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        images.len(),
        1,
        "every seckill service must run the same image: {images:?}"
    );
}

#[test]
fn dockerfile_is_multi_stage_with_pinned_bases_and_builds_only_from_what_it_copies() {
    let instructions = dockerfile();
    let mut stages: Vec<Option<String>> = Vec::new();
    for (keyword, args) in &instructions {
        if keyword != "FROM" {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let image = words[0];
        let alias = match words.get(1) {
            Some(kw) if kw.eq_ignore_ascii_case("as") => Some(words[2].to_string()),
            _ => None,
        };
        let earlier_stage = stages.iter().flatten().any(|s| s == image);
        assert!(
            earlier_stage || is_pinned(image),
            "`FROM {image}`: pin a version tag (never `latest`)"
        );
        stages.push(alias);
    }
    assert!(stages.len() >= 2, "expected a builder and a runtime stage");

    // What the build copies in must exist, and must include everything the
    // crate needs at compile time: the manifest, the lock file, the sources,
    // and lua/ and migrations/, embedded with include_str! and migrate!.
    let mut copied = BTreeSet::new();
    for (keyword, args) in &instructions {
        if keyword != "COPY" || args.contains("--from") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                repo().join(source).exists(),
                "the Dockerfile copies `{source}`, which does not exist"
            );
            copied.insert(source.to_string());
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src", "lua", "migrations"] {
        assert!(
            copied.contains(needed),
            "the Dockerfile never copies `{needed}`"
        );
    }
    let builds: Vec<&String> = instructions
        .iter()
        .filter(|(k, a)| k == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a)
        .collect();
    assert!(!builds.is_empty(), "the Dockerfile runs no `cargo build`");
    for build in builds {
        assert!(
            build.contains("--release"),
            "`{build}` is not a release build"
        );
        assert!(
            build.contains("--locked"),
            "`{build}` must honour Cargo.lock (--locked)"
        );
        // The manifest's example and test target live outside src/: either
        // they are copied in, or only the binary is built.
        assert!(
            build.contains("--bin seckill")
                || (copied.contains("loadtest") && copied.contains("tests")),
            "`{build}` builds targets whose sources are not copied"
        );
    }

    // The runtime stage.
    let last_from = instructions.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let last = |keyword: &str| {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
    };
    assert_eq!(last("ENTRYPOINT"), Some(r#"["seckill"]"#));
    assert_eq!(last("CMD"), Some(r#"["serve"]"#));
    assert!(
        last("EXPOSE").is_some_and(|p| p.split_whitespace().any(|p| p == "8080")),
        "the runtime stage must EXPOSE 8080"
    );
    let user = last("USER").expect("the runtime stage must set a non-root USER");
    let user_name = user.split(':').next().unwrap();
    assert!(
        user_name != "root" && user_name != "0",
        "the runtime stage runs as root (`USER {user}`)"
    );
    assert!(
        runtime
            .iter()
            .any(|(k, a)| k == "COPY" && a.contains("--from")),
        "the runtime stage must copy the binary from the builder"
    );
    assert_eq!(
        dockerfile_env().get("SECKILL_LISTEN").map(String::as_str),
        Some("0.0.0.0:8080"),
        "inside a container the gateway must listen on every interface"
    );

    let ignored: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .collect();
    for excluded in ["target", ".git"] {
        assert!(
            ignored.contains(excluded),
            ".dockerignore must exclude {excluded}/"
        );
    }
}

#[test]
fn compose_environment_is_a_valid_production_configuration_of_seckill() {
    let compose = compose();
    let vars = sample_vars();
    let known: BTreeSet<String> = {
        // Every SECKILL_* variable config.rs reads, from its ENV_X constants.
        let source = read("src/config.rs");
        source
            .split('"')
            .filter(|s| {
                s.starts_with("SECKILL_") && s.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .map(str::to_string)
            .collect()
    };
    assert!(
        known.contains("SECKILL_REDIS_URL"),
        "config.rs was not read as expected"
    );
    let subnets: Vec<String> = compose["networks"]
        .as_mapping()
        .expect("docker-compose.yml declares its network")
        .values()
        .filter_map(|n| n.get("ipam")?.get("config")?.as_sequence().cloned())
        .flatten()
        .filter_map(|c| c.get("subnet").and_then(scalar))
        .map(|s| interpolate(&s, &vars).unwrap())
        .collect();
    assert!(
        !subnets.is_empty(),
        "the compose network needs a fixed subnet"
    );

    for (name, _) in SECKILL_SERVICES {
        let mut env = dockerfile_env();
        for (key, value) in environment(service(&compose, name)) {
            if key.starts_with("SECKILL_") {
                assert!(
                    known.contains(&key),
                    "`{name}` sets {key}, which seckill does not read (src/config.rs)"
                );
            }
            let value = interpolate(&value, &vars).unwrap_or_else(|e| panic!("`{name}`: {e}"));
            env.insert(key, value);
        }
        let settings = Settings::from_lookup(|key| env.get(key).cloned())
            .unwrap_or_else(|e| panic!("`{name}`'s environment does not configure seckill: {e:#}"));
        assert!(
            settings.insecure_secrets().is_empty(),
            "`{name}` runs with development secrets: {:?}",
            settings.insecure_secrets()
        );
        assert_eq!(settings.log_format, seckill::config::LogFormat::Json);
        assert_eq!(settings.redis_url, "redis://redis:6379");
        assert!(
            settings
                .database_url
                .contains("pg-password-from-env@postgres:5432/seckill"),
            "`{name}` must reach the postgres service: {}",
            settings.database_url
        );
        assert_eq!(settings.listen.to_string(), "0.0.0.0:8080");
        // X-Forwarded-For is believed from the compose network (nginx), and
        // from nowhere else.
        let trusted: BTreeSet<String> = settings
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        let network: BTreeSet<String> = subnets.iter().cloned().collect();
        assert_eq!(
            trusted, network,
            "`{name}`: SECKILL_TRUSTED_PROXIES must be the compose network"
        );
    }
}

#[test]
fn compose_refuses_to_start_without_the_secrets() {
    let compose = compose();
    let none = BTreeMap::new();
    let env = environment(service(&compose, "gateway-1"));
    for secret in [
        "SECKILL_JWT_SECRET",
        "SECKILL_ADMIN_TOKEN",
        "SECKILL_DATABASE_URL",
    ] {
        let raw = env
            .get(secret)
            .unwrap_or_else(|| panic!("gateway-1 does not set {secret}"));
        assert!(
            interpolate(raw, &none).is_err(),
            "{secret} has a default in docker-compose.yml (`{raw}`): it must be required"
        );
    }
    let postgres = environment(service(&compose, "postgres"));
    let password = postgres
        .get("POSTGRES_PASSWORD")
        .expect("POSTGRES_PASSWORD");
    assert!(
        interpolate(password, &none).is_err(),
        "POSTGRES_PASSWORD must be required"
    );
}

#[test]
fn prometheus_scrapes_every_gateway_and_the_worker_by_compose_service_name_every_five_seconds() {
    let compose = compose();
    let names = service_names(&compose);
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(prometheus["global"]["scrape_interval"].as_str(), Some("5s"));
    let listen_port = host_port(&dockerfile_env()["SECKILL_LISTEN"]).1;

    let mut scraped = BTreeSet::new();
    let jobs = prometheus["scrape_configs"]
        .as_sequence()
        .expect("`scrape_configs` is a list");
    for job in jobs {
        for config in job["static_configs"].as_sequence().into_iter().flatten() {
            for target in config["targets"].as_sequence().into_iter().flatten() {
                let target = target.as_str().expect("targets are strings");
                let (host, port) = host_port(target);
                assert!(
                    names.contains(host),
                    "Prometheus scrapes `{target}`: `{host}` is not a compose service"
                );
                if let Some((_, command)) = SECKILL_SERVICES.iter().find(|(s, _)| *s == host) {
                    // `serve` answers on SECKILL_LISTEN, `worker` on
                    // SECKILL_WORKER_LISTEN (it has no listener without it).
                    let expected = match command[0] {
                        "serve" => listen_port,
                        _ => {
                            let env = service(&compose, host)["environment"]
                                ["SECKILL_WORKER_LISTEN"]
                                .as_str()
                                .unwrap_or_else(|| {
                                    panic!("`{host}` runs `seckill {}` without SECKILL_WORKER_LISTEN, so it serves no /metrics", command.join(" "))
                                })
                                .to_string();
                            host_port(&env).1
                        }
                    };
                    assert_eq!(port, expected, "`{target}`: seckill listens on {expected}");
                    let path = job["metrics_path"].as_str().unwrap_or("/metrics");
                    assert_eq!(path, "/metrics");
                }
                scraped.insert(host.to_string());
            }
        }
    }
    for (name, command) in SECKILL_SERVICES {
        if command[0] == "serve" || command[0] == "worker" {
            assert!(
                scraped.contains(*name),
                "Prometheus does not scrape `{name}`"
            );
        }
    }
    let mounted = mounts(service(&compose, "prometheus"))
        .iter()
        .any(|m| m.source == "./deploy/prometheus/prometheus.yml");
    assert!(
        mounted,
        "the prometheus service must mount deploy/prometheus/prometheus.yml"
    );
}

#[test]
fn grafana_provisions_the_prometheus_service_and_the_mounted_dashboards() {
    let compose = compose();
    let grafana = mounts(service(&compose, "grafana"));
    let target_of = |source: &str| {
        grafana
            .iter()
            .find(|m| m.source.trim_end_matches('/') == source)
            .map(|m| m.target.clone())
            .unwrap_or_else(|| panic!("grafana does not mount {source}"))
    };
    assert_eq!(
        target_of("./deploy/grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let dashboards_dir = target_of("./deploy/grafana/dashboards");

    let datasource = provisioned_datasource();
    let url = datasource["url"]
        .as_str()
        .expect("the datasource has a url");
    let authority = url
        .strip_prefix("http://")
        .expect("an http:// url")
        .trim_end_matches('/');
    let (host, port) = host_port(authority);
    assert_eq!(
        host, "prometheus",
        "the datasource must point at the compose service"
    );
    assert_eq!(port, 9090);
    assert!(
        datasource["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "the datasource needs a fixed uid for the dashboard to refer to"
    );

    let providers = yaml("deploy/grafana/provisioning/dashboards/seckill.yml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    assert_eq!(
        provider["options"]["path"].as_str(),
        Some(dashboards_dir.as_str()),
        "the dashboard provider must read where compose mounts the dashboards"
    );
}

#[test]
fn dashboard_is_grafana_json_whose_panels_query_the_provisioned_datasource() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "seckill");
    assert_eq!(dashboard["schemaVersion"], 39);
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let uid = provisioned_datasource()["uid"]
        .as_str()
        .unwrap()
        .to_string();

    let panels = dashboard_panels(&dashboard);
    assert!(
        panels.len() >= 10,
        "a sale needs more than {} panels",
        panels.len()
    );
    let top = dashboard["panels"].as_array().unwrap();
    let nested = top.iter().filter_map(|p| p["panels"].as_array()).flatten();
    let mut ids = Vec::new();
    for panel in top.iter().chain(nested) {
        let id = panel["id"].as_u64().expect("every panel has a numeric id");
        ids.push(id);
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {id} is wider than the grid");
        assert!(grid["h"].as_u64().unwrap() > 0);
    }
    let unique: BTreeSet<&u64> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "panel ids must be unique: {ids:?}");

    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(
            panel["datasource"]["uid"], uid,
            "panel `{title}` does not use the provisioned datasource"
        );
        let targets = panel["targets"].as_array().expect("panels have targets");
        assert!(!targets.is_empty(), "panel `{title}` has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], uid, "a query of `{title}`");
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel `{title}` has an empty query"
            );
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "unbalanced parentheses in `{expr}`"
            );
        }
    }
}

#[test]
fn dashboard_queries_every_metric_seckill_exports_and_no_other() {
    let dashboard = dashboard();
    let mut used = BTreeSet::new();
    for panel in dashboard_panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for name in metric_names(expr) {
                assert!(
                    KNOWN_METRICS.contains(&name.as_str()),
                    "panel `{}` queries `{name}`, which seckill does not export",
                    panel["title"]
                );
                used.insert(name);
            }
        }
    }
    let missing: Vec<&&str> = KNOWN_METRICS
        .iter()
        .filter(|m| !used.contains(**m))
        .collect();
    assert!(missing.is_empty(), "metrics without a panel: {missing:?}");
}

#[test]
fn every_dashboard_metric_is_still_recorded_by_the_source() {
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files);
    let source: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    for metric in KNOWN_METRICS {
        assert!(
            source.contains(&format!("\"{metric}\"")),
            "`{metric}` is on the dashboard but no longer recorded anywhere in src/"
        );
    }
}

#[test]
fn metric_names_are_found_in_expressions_with_histogram_suffixes_stripped() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(seckill_lua_seconds_bucket{script=\"x\"}[1m]))) \
         / sum(rate(seckill_worker_batch_size_count[1m])) + my_seckill_other",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["seckill_lua_seconds", "seckill_worker_batch_size"]);
}

#[test]
fn interpolation_follows_compose_rules() {
    let vars: BTreeMap<&str, &str> = [("SET", "v"), ("EMPTY", "")].into_iter().collect();
    assert_eq!(interpolate("a${SET}b", &vars).unwrap(), "avb");
    assert_eq!(interpolate("${UNSET:-d}", &vars).unwrap(), "d");
    assert_eq!(interpolate("${EMPTY:-d}", &vars).unwrap(), "d");
    assert_eq!(interpolate("${EMPTY-d}", &vars).unwrap(), "");
    assert_eq!(interpolate("$${SET}", &vars).unwrap(), "${SET}");
    assert!(interpolate("${UNSET:?set it}", &vars).is_err());
    assert!(interpolate("${EMPTY:?set it}", &vars).is_err());
    assert_eq!(interpolate("${SET:?set it}", &vars).unwrap(), "v");
}

#[test]
fn docker_compose_config_accepts_the_file_when_the_cli_is_installed() {
    let available = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        eprintln!("note: `docker compose` is not installed; skipping `docker compose config -q`");
        return;
    }
    // `config` validates and interpolates without a Docker engine.
    let out = Command::new("docker")
        .args(["compose", "-f", "docker-compose.yml", "config", "-q"])
        .current_dir(repo())
        .envs(SAMPLE_ENV.iter().copied())
        .output()
        .expect("run docker compose config");
    assert!(
        out.status.success(),
        "docker compose config rejects docker-compose.yml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
