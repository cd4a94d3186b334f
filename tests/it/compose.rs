//! The deployment files checked for structure, without Docker: the
//! `Dockerfile`, `docker-compose.yml`, the Prometheus configuration and the
//! Grafana provisioning and dashboard under `deploy/`.
//!
//! The YAML and JSON files are read with serde into the structures below,
//! which hold what the checks look at and in the forms the files use (a
//! form they do not expect fails to deserialize, naming where). Nothing here
//! needs Redis, PostgreSQL or a Docker engine; the one check that needs the
//! `docker compose` CLI is skipped, with a note, where it is absent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use seckill::config::Settings;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value as Yaml;

/// Every service of the production-like topology.
const EXPECTED_SERVICES: &str =
    "redis postgres migrate gateway-1 gateway-2 worker nginx prometheus grafana jaeger";

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
const KNOWN_METRICS: &str = "
    seckill_http_requests_total seckill_http_request_seconds seckill_purchases_total
    seckill_lua_seconds seckill_cache_requests_total seckill_rate_limited_total
    seckill_tokens_issued_total seckill_units_returned_total seckill_stream_length
    seckill_stream_pending seckill_worker_batch_size seckill_db_write_seconds
    seckill_orders_persisted_total seckill_orders_acknowledged_total
    seckill_orders_claimed_total seckill_orders_expired_total seckill_reconcile_drift";

fn known_metrics() -> BTreeSet<&'static str> {
    KNOWN_METRICS.split_whitespace().collect()
}

/// Values for the variables docker-compose.yml interpolates, as an operator's
/// `.env` would give them.
const SAMPLE_ENV: &[(&str, &str)] = &[
    ("POSTGRES_PASSWORD", "pg-password-from-env"),
    ("SECKILL_JWT_SECRET", "jwt-secret-from-env"),
    ("SECKILL_ADMIN_TOKEN", "admin-token-from-env"),
];

/// `docker-compose.yml`: `volumes` and `ports` in the short syntax,
/// `depends_on` with conditions, `command` as a list.
#[derive(Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
    volumes: BTreeMap<String, Yaml>,
    networks: BTreeMap<String, Network>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Service {
    image: Option<String>,
    build: Option<Yaml>,
    command: Vec<String>,
    environment: BTreeMap<String, String>,
    volumes: Vec<String>,
    ports: Vec<String>,
    depends_on: BTreeMap<String, Dependency>,
    healthcheck: Option<Yaml>,
    restart: Option<String>,
    profiles: Vec<String>,
    deploy: Option<Yaml>,
}

#[derive(Deserialize)]
struct Dependency {
    condition: Condition,
}

/// Compose's conditions: any other value fails to deserialize.
#[derive(Deserialize, Debug, PartialEq, Clone, Copy)]
enum Condition {
    #[serde(rename = "service_started")]
    Started,
    #[serde(rename = "service_healthy")]
    Healthy,
    #[serde(rename = "service_completed_successfully")]
    Completed,
}

#[derive(Deserialize)]
struct Network {
    ipam: Option<Ipam>,
}

#[derive(Deserialize)]
struct Ipam {
    config: Vec<BTreeMap<String, String>>,
}

/// `deploy/grafana/dashboards/seckill.json`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Dashboard {
    uid: String,
    schema_version: u64,
    title: String,
    panels: Vec<Panel>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Panel {
    id: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    title: String,
    grid_pos: BTreeMap<String, u64>,
    datasource: Option<BTreeMap<String, String>>,
    #[serde(default)]
    targets: Vec<Query>,
    #[serde(default)]
    panels: Vec<Panel>,
}

#[derive(Deserialize)]
struct Query {
    datasource: BTreeMap<String, String>,
    expr: String,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(file: &str) -> String {
    let path = repo().join(file);
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// A YAML file, `<<` merge keys applied (again while a merge brings in
/// another: an anchor that merges an anchor).
fn yaml<T: DeserializeOwned>(file: &str) -> T {
    let mut value: Yaml = serde_yaml::from_str(&read(file)).unwrap();
    loop {
        let before = value.clone();
        value.apply_merge().unwrap();
        if value == before {
            break;
        }
    }
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn compose() -> Compose {
    yaml("docker-compose.yml")
}

impl Compose {
    fn service(&self, name: &str) -> &Service {
        let service = self.services.get(name);
        service.unwrap_or_else(|| panic!("no service `{name}` in compose"))
    }

    /// `(service, source, target)` of every `source:target[:mode]` volume (a
    /// bare path is an anonymous volume: nothing to declare or check).
    fn mounts(&self) -> Vec<(&str, &str, &str)> {
        let mut out = Vec::new();
        for (name, service) in &self.services {
            for volume in &service.volumes {
                if let [source, target, ..] = volume.split(':').collect::<Vec<_>>()[..] {
                    out.push((name.as_str(), source, target));
                }
            }
        }
        out
    }

    /// The services of profile `profile` (`None`: those of no profile, which
    /// every `docker compose up` starts).
    fn in_profile(&self, profile: Option<&str>) -> BTreeMap<&str, &Service> {
        let services = self.services.iter().filter(|(_, s)| match profile {
            None => s.profiles.is_empty(),
            Some(p) => s.profiles.iter().any(|q| q == p),
        });
        services.map(|(name, s)| (name.as_str(), s)).collect()
    }

    /// `source → target` of the bind mounts of a service.
    fn binds_of(&self, service: &str) -> BTreeMap<&str, &str> {
        let binds = self.mounts().into_iter().filter(|m| m.0 == service);
        binds.map(|(_, source, target)| (source, target)).collect()
    }
}

/// `(host port, container port, protocol)` of `[ip:][host:]container[/protocol]`.
fn port(spec: &str) -> (Option<&str>, &str, &str) {
    let (spec, protocol) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let mut parts = spec.rsplitn(3, ':');
    let target = parts.next().unwrap();
    (parts.next(), target, protocol)
}

fn is_bind(source: &str) -> bool {
    source.starts_with(['.', '/', '~'])
}

fn is_pinned(image: &str) -> bool {
    let name = image.rsplit('/').next().unwrap();
    let tag = name.split_once(':').map_or("", |(_, tag)| tag);
    let tagged = !tag.is_empty() && tag != "latest" && !tag.contains('$');
    tagged || image.contains("@sha256:")
}

/// `host:port` → (host, port).
fn host_port(target: &str) -> (&str, u16) {
    let (host, port) = target.rsplit_once(':').expect("host:port");
    (host, port.parse().expect("a numeric port"))
}

/// Compose's `${X}`, `${X:-default}` and `${X:?message}` (an empty value
/// counts as unset), the forms docker-compose.yml uses; others are refused.
fn interpolate(text: &str, vars: &BTreeMap<&str, &str>) -> Result<String, String> {
    let (mut out, mut rest) = (String::new(), text);
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let (expr, after) = rest[at + 2..].split_once('}').ok_or("unclosed ${")?;
        let (name, op) = expr.split_at(expr.find([':', '-', '?', '+']).unwrap_or(expr.len()));
        let value = vars.get(name).copied().filter(|v| !v.is_empty());
        out.push_str(match op.get(..2) {
            None if op.is_empty() => value.unwrap_or(""),
            Some(":-") => value.unwrap_or(&op[2..]),
            Some(":?") => value.ok_or(format!("{name} is required: {}", &op[2..]))?,
            _ => return Err(format!("unsupported interpolation `${{{expr}}}`")),
        });
        rest = after;
    }
    Ok(out + rest)
}

/// The Dockerfile's instructions (keyword, arguments) with continuation
/// lines joined and comments dropped; those of the last stage after `FROM`'s.
fn dockerfile() -> (Vec<(String, String)>, usize) {
    let text = read("Dockerfile");
    let lines = text.lines().filter(|l| !l.trim_start().starts_with('#'));
    let joined = lines.collect::<Vec<_>>().join("\n").replace("\\\n", " ");
    let split = joined.lines().filter_map(|l| l.trim().split_once(' '));
    let all: Vec<_> = split.map(|(k, a)| (k.to_uppercase(), a.into())).collect();
    let last_stage = all.iter().rposition(|(k, _)| k == "FROM").unwrap();
    (all, last_stage)
}

/// The variables the Dockerfile's last stage sets with `ENV`.
fn dockerfile_env() -> BTreeMap<String, String> {
    let (instructions, last_stage) = dockerfile();
    let mut env = BTreeMap::new();
    for (_, args) in instructions[last_stage..].iter().filter(|i| i.0 == "ENV") {
        for (k, v) in args.split_whitespace().filter_map(|p| p.split_once('=')) {
            env.insert(k.to_string(), v.trim_matches('"').to_string());
        }
    }
    env
}

fn seckill_listen_port() -> u16 {
    host_port(&dockerfile_env()["SECKILL_LISTEN"]).1
}

/// The arguments of every `directive` in an nginx file, comments dropped.
fn nginx_directives(text: &str, directive: &str) -> Vec<String> {
    let lines = text.lines().map(|l| l.split('#').next().unwrap().trim());
    let args = lines.filter_map(|l| l.strip_prefix(directive)?.strip_prefix(' '));
    let args = args.map(|a| a.trim_end_matches(';').trim().to_string());
    args.collect()
}

/// Every `seckill_…` metric an expression names, histogram suffixes stripped.
fn metric_names<'a>(expr: &'a str) -> BTreeSet<&'a str> {
    let mut names = BTreeSet::new();
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("seckill_") {
            let strip = |w: &'a str, suffix| w.strip_suffix(suffix).unwrap_or(w);
            names.insert(["_bucket", "_sum", "_count"].into_iter().fold(word, strip));
        }
    }
    names
}

fn dashboard() -> Dashboard {
    let file = "deploy/grafana/dashboards/seckill.json";
    serde_json::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

impl Dashboard {
    /// Every panel, the rows' nested panels included.
    fn all_panels(&self) -> Vec<&Panel> {
        let rows = self.panels.iter();
        rows.flat_map(|p| std::iter::once(p).chain(&p.panels))
            .collect()
    }

    /// The panels that query something: all but the rows.
    fn panels(&self) -> Vec<&Panel> {
        let panels = self.all_panels().into_iter();
        panels.filter(|p| p.kind != "row").collect()
    }
}

fn provisioned_datasource() -> Yaml {
    let file: Yaml = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let datasources = file["datasources"].as_sequence().unwrap();
    let prometheus = datasources.iter().find(|s| s["type"] == "prometheus");
    prometheus.expect("a prometheus datasource").clone()
}

// ------------------------------------------------------------------ tests --

#[test]
fn compose_defines_every_service_of_the_topology() {
    let compose = compose();
    for name in EXPECTED_SERVICES.split_whitespace() {
        compose.service(name);
    }
}

#[test]
fn every_compose_image_is_pinned_to_a_version_tag_or_built_from_this_repository() {
    for (name, service) in compose().services {
        if service.build.is_none() {
            let image = service.image.expect("`image` or `build`");
            assert!(is_pinned(&image), "`{name}`: pin `{image}`");
        }
    }
}

#[test]
fn every_bind_mounted_host_path_exists_in_the_repository() {
    let compose = compose();
    let mounts = compose.mounts();
    let binds: Vec<_> = mounts.iter().filter(|m| is_bind(m.1)).collect();
    // At least nginx's, Prometheus's and Grafana's configuration.
    assert!(binds.len() >= 3, "{binds:?}");
    for (service, source, _) in binds {
        let in_repo = source.starts_with("./") && repo().join(source).exists();
        assert!(in_repo, "`{service}` mounts `{source}`");
    }
}

#[test]
fn every_named_volume_is_declared_and_every_declared_volume_is_used() {
    let compose = compose();
    let mounts = compose.mounts();
    let named: Vec<_> = mounts.iter().filter(|m| !is_bind(m.1)).collect();
    let used: BTreeSet<&str> = named.iter().map(|m| m.1).collect();
    let declared: BTreeSet<&str> = compose.volumes.keys().map(|v| v.as_str()).collect();
    assert_eq!(used, declared, "volumes used and declared");
    for stateful in ["redis", "postgres"] {
        let kept = named.iter().any(|m| m.0 == stateful);
        assert!(kept, "`{stateful}` keeps its data in a volume");
    }
}

#[test]
fn depends_on_names_existing_services_with_conditions_they_can_meet() {
    use Condition::*;
    let compose = compose();
    for service in compose.services.values() {
        for (dependency, Dependency { condition }) in &service.depends_on {
            let target = compose.service(dependency);
            let restarts = !matches!(target.restart.as_deref(), None | Some("no"));
            match condition {
                Started => {}
                Healthy => assert!(target.healthcheck.is_some(), "{dependency}"),
                Completed => assert!(!restarts, "{dependency}"),
            }
        }
    }
    // The start-up order the topology relies on.
    let mut order = vec![("migrate", "postgres", Healthy)];
    for seckill in ["gateway-1", "gateway-2", "worker"] {
        order.push((seckill, "migrate", Completed));
        order.push((seckill, "redis", Healthy));
    }
    for (name, dependency, condition) in order {
        let found = compose.service(name).depends_on.get(dependency);
        let found = found.map(|d| d.condition);
        assert_eq!(found, Some(condition), "{name} → {dependency}");
    }
}

#[test]
fn published_host_ports_are_unique() {
    let mut seen = BTreeMap::new();
    for (name, service) in compose().services {
        // A container port alone is published on a port Docker picks.
        for (host, _, protocol) in service.ports.iter().map(|p| port(p)) {
            let Some(host) = host else { continue };
            let host: u16 = host.parse().expect("a numeric host port");
            let other = seen.insert((host, protocol.to_string()), name.clone());
            assert_eq!(other, None, "{host}/{protocol} twice");
        }
    }
    assert!(seen.values().any(|s| s == "nginx"), "nginx publishes");
}

#[test]
fn nginx_publishes_its_listen_port_and_proxies_to_the_compose_gateways() {
    let compose = compose();
    let binds = compose.binds_of("nginx");
    let mounted: BTreeMap<&str, &str> = binds.into_iter().map(|(s, t)| (t, s)).collect();
    // Follow the includes from the main file: each must be mounted where
    // nginx looks for it (relative paths are relative to /etc/nginx).
    let mut files = vec!["/etc/nginx/nginx.conf".to_string()];
    let (mut seen, mut listens, mut upstreams) = (BTreeSet::new(), BTreeSet::new(), vec![]);
    while let Some(path) = files.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let text = read(mounted.get(path.as_str()).expect("mounted"));
        for include in nginx_directives(&text, "include") {
            // The nginx:alpine image has no Lua module: compose runs nginx.conf.
            assert!(!include.contains("lua"), "{include}");
            let absolute = Path::new("/etc/nginx").join(&include);
            files.push(absolute.to_string_lossy().into_owned());
        }
        for listen in nginx_directives(&text, "listen") {
            listens.insert(port(listen.split(' ').next().unwrap()).1.to_string());
        }
        if path.ends_with("/upstreams.conf") {
            upstreams.extend(nginx_directives(&text, "server"));
        }
    }
    let published = &compose.service("nginx").ports;
    let targets: BTreeSet<String> = published.iter().map(|p| port(p).1.into()).collect();
    assert!(!targets.is_empty(), "nginx publishes no port");
    assert!(targets.is_subset(&listens), "{targets:?} {listens:?}");

    let mut hosts = BTreeSet::new();
    for address in upstreams.iter().map(|s| s.split(' ').next().unwrap()) {
        let (host, port) = host_port(address);
        assert_eq!(port, seckill_listen_port(), "{address}");
        hosts.insert(host);
    }
    let gateways = SECKILL_SERVICES.iter().filter(|s| s.1[0] == "serve");
    assert_eq!(hosts, gateways.map(|s| s.0).collect(), "the upstreams");
}

#[test]
fn seckill_services_build_this_repository_and_run_commands_its_cli_accepts() {
    let compose = compose();
    assert!(repo().join("Dockerfile").is_file());
    let mut images = BTreeSet::new();
    for (name, command) in SECKILL_SERVICES {
        let service = compose.service(name);
        // `build: .`, or `build: {context: ., dockerfile: Dockerfile}`.
        let build = service.build.as_ref().expect("`build`");
        let context = build.as_str().or(build["context"].as_str());
        let dockerfile = build["dockerfile"].as_str();
        assert!(matches!(context, None | Some(".") | Some("./")), "{name}");
        assert!(matches!(dockerfile, None | Some("Dockerfile")), "{name}");
        images.insert(service.image.as_deref());

        assert_eq!(service.command, *command, "`{name}`'s command");
        // clap parses the whole command line before anything else runs, so
        // `--help` proves the subcommand and its flags exist.
        let seckill = Command::new(env!("CARGO_BIN_EXE_seckill"));
        let out = { seckill }.args(*command).arg("--help").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "`{name}`: {stderr}");
    }
    assert_eq!(images.len(), 1, "one image: {images:?}");
}

#[test]
fn dockerfile_is_multi_stage_with_pinned_bases_and_builds_only_from_what_it_copies() {
    let (instructions, last_stage) = dockerfile();
    let all = |keyword: &'static str| {
        let found = instructions.iter().filter(move |i| i.0 == keyword);
        found.map(|(_, args)| args.as_str())
    };
    let mut stages = Vec::new();
    for from in all("FROM") {
        let words: Vec<&str> = from.split(' ').filter(|w| !w.starts_with("--")).collect();
        // `FROM image [AS name]`: an earlier stage, or a pinned image.
        assert!(stages.contains(&words[0]) || is_pinned(words[0]), "{from}");
        stages.push(words.last().unwrap());
    }
    assert!(stages.len() >= 2, "a builder and a runtime stage");

    // What the build copies in must exist, and must include everything the
    // crate needs at compile time: the manifest, the lock file, the sources,
    // and lua/, web/, docs/openapi.json and migrations/, embedded with
    // include_str! and migrate!.
    let mut copied = BTreeSet::new();
    for copy in all("COPY").filter(|a| !a.contains("--from")) {
        let words: Vec<&str> = copy.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(repo().join(source).exists(), "COPY {source}");
            copied.insert(source);
        }
    }
    let needed = [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "lua",
        "migrations",
        "web",
        "docs/openapi.json",
    ];
    assert!(copied.is_superset(&needed.into()), "{copied:?}");
    let builds: Vec<&str> = all("RUN").filter(|a| a.contains("cargo build")).collect();
    assert!(!builds.is_empty(), "the Dockerfile runs no `cargo build`");
    // The manifest's example and test target live outside src/: either they
    // are copied in, or only the binary is built.
    let every_target = copied.contains("loadtest") && copied.contains("tests");
    for build in builds {
        assert!(build.contains("--release") && build.contains("--locked"));
        assert!(build.contains("--bin seckill") || every_target, "{build}");
    }

    // The runtime stage: the builder's binary, run by a non-root user.
    let runtime = &instructions[last_stage..];
    let last = |keyword: &str| runtime.iter().rfind(|i| i.0 == keyword).map(|i| &i.1[..]);
    assert_eq!(last("ENTRYPOINT"), Some(r#"["seckill"]"#));
    assert_eq!(last("CMD"), Some(r#"["serve"]"#));
    assert!(last("EXPOSE").unwrap().split(' ').any(|p| p == "8080"));
    let user = last("USER").expect("the runtime stage sets USER");
    assert!(!matches!(user.split(':').next(), Some("root" | "0")));
    assert!(last("COPY").is_some_and(|a| a.contains("--from")));
    // Inside a container the gateway must listen on every interface.
    assert_eq!(dockerfile_env()["SECKILL_LISTEN"], "0.0.0.0:8080");

    let dockerignore = read(".dockerignore");
    let ignored = dockerignore.lines().map(|l| l.trim().trim_end_matches('/'));
    let ignored: BTreeSet<&str> = ignored.collect();
    assert!(ignored.is_superset(&["target", ".git"].into()));
}

#[test]
fn compose_environment_is_a_valid_production_configuration_of_seckill() {
    let compose = compose();
    let vars = SAMPLE_ENV.iter().copied().collect();
    // Every SECKILL_* variable config.rs reads, from its ENV_X constants.
    let config = read("src/config.rs");
    let is_name = |s: &&str| s.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    let known = config.split('"').filter(|s| s.starts_with("SECKILL_"));
    let known: BTreeSet<&str> = known.filter(is_name).collect();
    assert!(known.contains("SECKILL_REDIS_URL"), "config.rs is read");
    let mut subnets = BTreeSet::new();
    for ipam in compose.networks.values().filter_map(|n| n.ipam.as_ref()) {
        for subnet in ipam.config.iter().filter_map(|c| c.get("subnet")) {
            subnets.insert(interpolate(subnet, &vars).unwrap());
        }
    }
    assert!(!subnets.is_empty(), "the network has a fixed subnet");

    for (name, _) in SECKILL_SERVICES {
        let mut env = dockerfile_env();
        for (key, value) in &compose.service(name).environment {
            let read = !key.starts_with("SECKILL_") || known.contains(&key[..]);
            assert!(read, "`{name}` sets {key}, which seckill does not read");
            env.insert(key.clone(), interpolate(value, &vars).unwrap());
        }
        let settings = Settings::from_lookup(|key| env.get(key).cloned());
        let settings = settings.unwrap_or_else(|e| panic!("`{name}`: {e:#}"));
        let insecure = settings.insecure_secrets();
        assert!(insecure.is_empty(), "`{name}`: {insecure:?}");
        assert_eq!(settings.log_format, seckill::config::LogFormat::Json);
        assert_eq!(settings.redis_url, "redis://redis:6379");
        let url = settings.database_url;
        assert!(url.contains("pg-password-from-env@postgres:5432/seckill"));
        assert_eq!(settings.listen.to_string(), "0.0.0.0:8080");
        // X-Forwarded-For is believed from the compose network (nginx), and
        // from nowhere else.
        let trusted = settings.trusted_proxies.iter().map(|p| p.to_string());
        assert_eq!(trusted.collect::<BTreeSet<_>>(), subnets, "`{name}`");
    }
}

#[test]
fn compose_refuses_to_start_without_the_secrets() {
    let compose = compose();
    let gateway = &compose.service("gateway-1").environment;
    let postgres = &compose.service("postgres").environment;
    let secrets = [
        &gateway["SECKILL_JWT_SECRET"],
        &gateway["SECKILL_ADMIN_TOKEN"],
        &gateway["SECKILL_DATABASE_URL"],
        &postgres["POSTGRES_PASSWORD"],
    ];
    for raw in secrets {
        // Required (`${X:?…}`), never defaulted.
        assert!(interpolate(raw, &BTreeMap::new()).is_err(), "{raw}");
    }
}

#[test]
fn prometheus_scrapes_every_gateway_and_the_worker_by_compose_service_name_every_five_seconds() {
    let compose = compose();
    let prometheus: Yaml = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(prometheus["global"]["scrape_interval"], "5s");

    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"].as_sequence().unwrap() {
        let configs = job["static_configs"].as_sequence().unwrap();
        let targets = configs.iter().flat_map(|c| c["targets"].as_sequence());
        for target in targets.flatten().filter_map(|t| t.as_str()) {
            let (host, port) = host_port(target);
            assert!(compose.services.contains_key(host), "{host}");
            let Some((_, command)) = SECKILL_SERVICES.iter().find(|s| s.0 == host) else {
                continue;
            };
            // `serve` answers on SECKILL_LISTEN; `worker` on
            // SECKILL_WORKER_LISTEN, without which it has no listener.
            let env = &compose.service(host).environment;
            let expected = match command[0] {
                "serve" => seckill_listen_port(),
                _ => host_port(&env["SECKILL_WORKER_LISTEN"]).1,
            };
            assert_eq!(port, expected, "{host}");
            let path = job["metrics_path"].as_str();
            assert!(matches!(path, None | Some("/metrics")), "{path:?}");
            scraped.insert(host);
        }
    }
    let listening = SECKILL_SERVICES.iter().filter(|s| s.1[0] != "migrate");
    assert_eq!(scraped, listening.map(|s| s.0).collect(), "scraped");
    let binds = compose.binds_of("prometheus");
    assert!(binds.contains_key("./deploy/prometheus/prometheus.yml"));
}

#[test]
fn grafana_provisions_the_prometheus_service_and_the_mounted_dashboards() {
    let compose = compose();
    let binds = compose.binds_of("grafana");
    let provisioning = binds["./deploy/grafana/provisioning"];
    assert_eq!(provisioning, "/etc/grafana/provisioning");

    let datasource = provisioned_datasource();
    let url = datasource["url"].as_str().unwrap();
    let authority = url.strip_prefix("http://").unwrap().trim_end_matches('/');
    assert_eq!(host_port(authority), ("prometheus", 9090));
    // The dashboard refers to it by a fixed uid.
    assert!(!datasource["uid"].as_str().unwrap_or_default().is_empty());

    // The dashboard provider reads where compose mounts the dashboards.
    let providers: Yaml = yaml("deploy/grafana/provisioning/dashboards/seckill.yml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"], "file");
    let path = provider["options"]["path"].as_str();
    assert_eq!(path, Some(binds["./deploy/grafana/dashboards"]));
}

#[test]
fn dashboard_is_grafana_json_whose_panels_query_the_provisioned_datasource() {
    let dashboard = dashboard();
    assert_eq!(dashboard.uid, "seckill");
    assert_eq!(dashboard.schema_version, 39);
    assert!(!dashboard.title.is_empty());
    let datasource = provisioned_datasource();
    let uid = datasource["uid"].as_str().unwrap();

    let count = dashboard.panels().len();
    assert!(count >= 10, "a sale needs more than {count} panels");
    let mut ids = BTreeSet::new();
    for panel in dashboard.all_panels() {
        assert!(ids.insert(panel.id), "panel ids are unique: {}", panel.id);
        let grid = |k: &str| panel.grid_pos[k];
        assert!(grid("x") + grid("w") <= 24 && grid("h") > 0, "{}", panel.id);
    }

    for panel in dashboard.panels() {
        let title = &panel.title;
        let datasource = panel.datasource.as_ref().map(|d| d["uid"].as_str());
        assert_eq!(datasource, Some(uid), "{title}");
        assert!(!panel.targets.is_empty(), "{title} has no query");
        for Query { datasource, expr } in &panel.targets {
            assert_eq!(datasource["uid"], uid, "a query of {title}");
            assert!(!expr.trim().is_empty(), "{title}: an empty query");
            let (open, close) = (expr.matches('(').count(), expr.matches(')').count());
            assert_eq!(open, close, "unbalanced parentheses in `{expr}`");
        }
    }
}

#[test]
fn dashboard_queries_every_metric_seckill_exports_and_no_other() {
    let dashboard = dashboard();
    let queries = dashboard.panels().into_iter().flat_map(|p| &p.targets);
    let used: BTreeSet<&str> = queries.flat_map(|q| metric_names(&q.expr)).collect();
    assert_eq!(used, known_metrics());
}

#[test]
fn every_dashboard_metric_is_still_recorded_by_the_source() {
    fn source(dir: &Path) -> String {
        let mut text = String::new();
        for path in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
            if path.is_dir() {
                text += &source(&path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text += &std::fs::read_to_string(path).unwrap();
            }
        }
        text
    }
    let source = source(&repo().join("src"));
    for metric in known_metrics() {
        let recorded = source.contains(&format!("\"{metric}\""));
        assert!(recorded, "`{metric}` is recorded nowhere in src/");
    }
}

#[test]
fn metric_names_are_found_in_expressions_with_histogram_suffixes_stripped() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(seckill_lua_seconds_bucket{script=\"x\"}[1m]))) \
         / sum(rate(seckill_worker_batch_size_count[1m])) + my_seckill_other",
    );
    let expected = ["seckill_lua_seconds", "seckill_worker_batch_size"];
    assert_eq!(names, expected.into());
}

#[test]
fn interpolation_follows_compose_rules() {
    let vars = [("SET", "v"), ("EMPTY", "")].into();
    let ok = |text: &str| interpolate(text, &vars).unwrap();
    assert_eq!(ok("a${SET}b"), "avb");
    assert_eq!(ok("${UNSET:-d}"), "d");
    assert_eq!(ok("${EMPTY:-d}"), "d");
    assert_eq!(ok("${SET:?set it}"), "v");
    assert!(interpolate("${UNSET:?set it}", &vars).is_err());
    assert!(interpolate("${EMPTY:?set it}", &vars).is_err());
    // A form docker-compose.yml does not use is refused, not guessed at.
    assert!(interpolate("${SET-d}", &vars).is_err());
}

#[test]
fn docker_compose_config_accepts_the_file_when_the_cli_is_installed() {
    let version = Command::new("docker").args(["compose", "version"]).output();
    if !version.is_ok_and(|o| o.status.success()) {
        eprintln!("note: no `docker compose`; skipping `docker compose config -q`");
        return;
    }
    // `config` validates and interpolates without a Docker engine.
    let out = Command::new("docker")
        .args(["compose", "-f", "docker-compose.yml", "config", "-q"])
        .current_dir(repo())
        .envs(SAMPLE_ENV.iter().copied())
        .output()
        .expect("docker compose config runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "docker compose config: {stderr}");
}

// -------------------------------------------------------- cluster profile --

/// The value after `flag` in a command line.
fn arg<'a>(command: &'a [String], flag: &str) -> Option<&'a str> {
    let at = command.iter().position(|a| a == flag)?;
    command.get(at + 1).map(String::as_str)
}

/// The Redis Cluster nodes of the `cluster` profile: its services that run
/// `redis-server`.
fn cluster_nodes(compose: &Compose) -> BTreeMap<&str, &Service> {
    let mut nodes = compose.in_profile(Some("cluster"));
    nodes.retain(|_, s| s.command.first().is_some_and(|c| c == "redis-server"));
    nodes
}

/// The `cluster` profile's one-shot service that joins the nodes: its
/// `CLUSTER_NODES` and its shell script, compose's `$$` unescaped.
fn cluster_init(compose: &Compose) -> (Vec<String>, String) {
    let init = compose.service("redis-cluster-init");
    let nodes = init.environment["CLUSTER_NODES"].split_whitespace();
    let [sh, flags, script] = &init.command[..] else {
        panic!("`sh -euc SCRIPT`: {:?}", init.command);
    };
    assert_eq!((sh.as_str(), flags.as_str()), ("sh", "-euc"));
    let script = script.replace("$$", "$");
    (nodes.map(str::to_string).collect(), script)
}

#[test]
fn services_of_no_profile_are_the_default_topology_and_use_nothing_of_the_cluster_profile() {
    let compose = compose();
    let default = compose.in_profile(None);
    let names: BTreeSet<&str> = default.keys().copied().collect();
    assert_eq!(names, EXPECTED_SERVICES.split_whitespace().collect());
    let profiles = compose.services.values().flat_map(|s| &s.profiles);
    let profiles: BTreeSet<&str> = profiles.map(String::as_str).collect();
    assert_eq!(profiles, ["cluster"].into(), "the profiles");
    for (name, service) in &default {
        for dependency in service.depends_on.keys() {
            let in_default = default.contains_key(dependency.as_str());
            assert!(in_default, "`{name}` depends on `{dependency}`");
        }
        let mounts = service.volumes.iter().map(|v| v.split(':').next().unwrap());
        for source in mounts {
            let cluster = source.contains("cluster") || source.starts_with("redis-node");
            assert!(!cluster, "`{name}` mounts `{source}`");
        }
        let redis = service.environment.get("SECKILL_REDIS_URL");
        assert!(matches!(
            redis.map(String::as_str),
            None | Some("redis://redis:6379")
        ));
        assert!(service.deploy.is_none(), "`{name}`");
    }
}

#[test]
fn cluster_profile_runs_six_cluster_enabled_nodes_joined_as_three_primaries_and_three_replicas() {
    let compose = compose();
    let nodes = cluster_nodes(&compose);
    assert_eq!(nodes.len(), 6, "{:?}", nodes.keys());
    let mut announced = BTreeSet::new();
    for (name, node) in &nodes {
        let command = &node.command;
        assert_eq!(arg(command, "--cluster-enabled"), Some("yes"), "{name}");
        // Clients are sent to a node by its own service name.
        assert_eq!(arg(command, "--cluster-announce-hostname"), Some(*name));
        let endpoint = arg(command, "--cluster-preferred-endpoint-type");
        assert_eq!(endpoint, Some("hostname"), "{name}");
        let port = arg(command, "--cluster-announce-port").expect("announced port");
        announced.insert(format!("{name}:{port}"));
        // Durable as the single redis, each with a volume of its own.
        assert_eq!(arg(command, "--appendonly"), Some("yes"), "{name}");
        assert_eq!(arg(command, "--maxmemory-policy"), Some("noeviction"));
        let volumes = compose.mounts().into_iter().filter(|m| m.0 == *name);
        let data: Vec<_> = volumes
            .filter(|m| m.2 == "/data" && !is_bind(m.1))
            .collect();
        assert_eq!(data.len(), 1, "{name}: {data:?}");
        assert!(node.healthcheck.is_some(), "{name}");
    }

    let init = compose.service("redis-cluster-init");
    assert_eq!(init.profiles, ["cluster"]);
    assert_eq!(init.restart.as_deref(), Some("no"), "a one-shot service");
    for name in nodes.keys() {
        let condition = init.depends_on.get(*name).map(|d| d.condition);
        assert_eq!(condition, Some(Condition::Healthy), "init → {name}");
    }
    let (listed, script) = cluster_init(&compose);
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), announced);
    assert_eq!(listed.len(), 6, "{listed:?}");
    // Six nodes, one replica per primary: three primaries, three replicas.
    for part in [
        "redis-cli --cluster create ",
        "--cluster-replicas 1 ",
        "--cluster-yes",
    ] {
        assert!(script.contains(part), "`{part}` in\n{script}");
    }
    assert!(
        script.contains("cluster_state:ok"),
        "it waits for the cluster"
    );
}

#[test]
fn cluster_profile_has_two_gateways_on_the_node_list_separate_workers_and_nginx_over_both() {
    let compose = compose();
    let cluster = compose.in_profile(Some("cluster"));
    let nodes = cluster_nodes(&compose);
    let seckill = |s: &&Service| s.build.is_some();
    let roles = cluster.iter().filter(|(_, s)| seckill(s));
    let by_command = |command: &[&str]| -> BTreeSet<&str> {
        let same = roles.clone().filter(|(_, s)| s.command == command);
        same.map(|(name, _)| *name).collect()
    };
    let gateways = by_command(&["serve", "--no-workers"]);
    assert_eq!(gateways, ["cluster-gateway-1", "cluster-gateway-2"].into());
    let workers = by_command(&["worker"]);
    assert_eq!(workers, ["cluster-worker"].into());
    let replicas = compose.service("cluster-worker").deploy.as_ref();
    let replicas = replicas.and_then(|d| d["replicas"].as_u64());
    assert_eq!(replicas, Some(2), "two worker containers");

    let vars: BTreeMap<&str, &str> = SAMPLE_ENV.iter().copied().collect();
    let expected_seeds: BTreeSet<String> = nodes
        .iter()
        .map(|(name, node)| {
            let port = arg(&node.command, "--cluster-announce-port").unwrap();
            format!("redis://{name}:{port}")
        })
        .collect();
    for name in gateways.iter().chain(&workers).chain(&["cluster-migrate"]) {
        let service = compose.service(name);
        // A valid configuration of seckill in cluster mode, on a database
        // of its own (the default stack keeps `seckill`).
        let mut env = dockerfile_env();
        for (key, value) in &service.environment {
            env.insert(key.clone(), interpolate(value, &vars).unwrap());
        }
        let settings = Settings::from_lookup(|key| env.get(key).cloned());
        let settings = settings.unwrap_or_else(|e| panic!("`{name}`: {e:#}"));
        let seeds = seckill::stock::connection::seeds(&settings.redis_url);
        assert!(
            seeds.len() > 1,
            "`{name}`: cluster mode needs several seeds"
        );
        let seeds: BTreeSet<String> = seeds.into_iter().map(str::to_string).collect();
        assert_eq!(seeds, expected_seeds, "`{name}` lists every node");
        assert!(
            settings
                .database_url
                .ends_with("@postgres:5432/seckill_cluster")
        );
        assert!(settings.insecure_secrets().is_empty(), "`{name}`");
        if *name != "cluster-migrate" {
            use Condition::*;
            let after = [
                ("cluster-migrate", Completed),
                ("redis-cluster-init", Completed),
                ("postgres", Healthy),
            ];
            for (dependency, condition) in after {
                let found = service.depends_on.get(dependency).map(|d| d.condition);
                assert_eq!(found, Some(condition), "{name} → {dependency}");
            }
            assert!(!service.depends_on.contains_key("redis"), "{name}");
        }
    }
    let worker = &compose.service("cluster-worker").environment;
    assert_eq!(host_port(&worker["SECKILL_WORKER_LISTEN"]).1, 9091);

    // nginx-cluster: the same nginx.conf and seckill.conf as nginx, its own
    // upstream list naming both cluster gateways on their listen port.
    let binds = compose.binds_of("nginx-cluster");
    let mounted: BTreeMap<&str, &str> = binds.into_iter().map(|(s, t)| (t, s)).collect();
    assert_eq!(mounted["/etc/nginx/nginx.conf"], "./nginx/nginx.conf");
    assert_eq!(mounted["/etc/nginx/seckill.conf"], "./nginx/seckill.conf");
    let upstreams = read(mounted["/etc/nginx/upstreams.conf"]);
    let servers = nginx_directives(&upstreams, "server");
    let mut hosts = BTreeSet::new();
    for address in servers.iter().map(|s| s.split(' ').next().unwrap()) {
        let (host, port) = host_port(address);
        assert_eq!(port, seckill_listen_port(), "{address}");
        hosts.insert(host);
    }
    assert_eq!(hosts, gateways, "nginx-cluster's upstreams");
    let site = read("nginx/seckill.conf");
    let upstream = site.split("upstream seckill {").nth(1).unwrap();
    let upstream = upstream.split('}').next().unwrap();
    for directive in ["include upstreams.conf;", "least_conn;", "keepalive 64;"] {
        assert!(
            upstream.contains(directive),
            "`{directive}` in the upstream"
        );
    }
    let nginx = compose.service("nginx-cluster");
    assert_eq!(nginx.image, compose.service("nginx").image);
    for gateway in &gateways {
        let condition = nginx.depends_on.get(*gateway).map(|d| d.condition);
        assert_eq!(
            condition,
            Some(Condition::Healthy),
            "nginx-cluster → {gateway}"
        );
    }
}

/// Local `redis-server`s started with a cluster node's compose command line,
/// killed (and their directory removed) on drop.
struct LocalNodes {
    children: Vec<std::process::Child>,
    dir: std::path::PathBuf,
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p PORT ARGS…`'s output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let mut cli = Command::new("redis-cli");
    cli.args(["-p", &port.to_string()]).args(args);
    let out = cli.output().expect("redis-cli runs (is it installed?)");
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

/// Runs the init script as the service does, on `addresses`.
fn run_init_script(script: &str, addresses: &str) -> std::process::Output {
    let mut sh = Command::new("sh");
    sh.args(["-euc", script]).env("CLUSTER_NODES", addresses);
    sh.output().unwrap()
}

#[test]
fn cluster_init_script_joins_the_compose_nodes_into_three_primaries_with_a_replica_each() {
    let compose = compose();
    let (_, script) = cluster_init(&compose);
    let dir = std::env::temp_dir().join(format!("seckill-it-compose-{}", uuid::Uuid::new_v4()));
    let mut nodes = LocalNodes {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let mut ports = Vec::new();
    // Each node runs its compose command line, with the loopback address
    // and a spare port (and its bus port) in place of its service name and
    // 6379.
    for (name, node) in cluster_nodes(&compose) {
        let port = loop {
            let port = crate::procs::spare_port();
            let bus = std::net::TcpListener::bind(("127.0.0.1", port + 10000));
            if port < 55000 && bus.is_ok() {
                break port;
            }
        };
        let own_dir = dir.join(name);
        std::fs::create_dir_all(&own_dir).unwrap();
        let mut args = node.command[1..].to_vec();
        let mut set = |flag: &str, value: String| {
            let at = args.iter().position(|a| a == flag).expect(flag);
            args[at + 1] = value;
        };
        set("--cluster-announce-hostname", "127.0.0.1".into());
        set("--cluster-announce-port", port.to_string());
        set("--cluster-announce-bus-port", (port + 10000).to_string());
        let child = Command::new("redis-server")
            .args(&args)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&own_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts (is it installed?)");
        nodes.children.push(child);
        ports.push(port);
    }
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let addresses = addresses.join(" ");

    // The script waits for every node to answer, then creates the cluster.
    let out = run_init_script(&script, &addresses);
    let output = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the init script failed:\n{output}");
    for port in &ports {
        let info = redis_cli(*port, &["cluster", "info"]);
        assert!(info.contains("cluster_state:ok\n"), "{port}: {info}");
        assert!(info.contains("cluster_known_nodes:6\n"), "{port}: {info}");
    }
    // Each node's own role (`ROLE`: other nodes learn of a new replica by
    // gossip, later): three primaries, and three replicas following three
    // different primaries.
    let (mut primaries, mut followed) = (BTreeSet::new(), Vec::new());
    for port in &ports {
        let role = redis_cli(*port, &["role"]);
        let lines: Vec<&str> = role.lines().collect();
        match lines[0] {
            "master" => assert!(primaries.insert(port.to_string())),
            "slave" => followed.push(lines[2].to_string()),
            other => panic!("{port}: role {other}"),
        }
    }
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    let distinct: BTreeSet<String> = followed.iter().cloned().collect();
    assert_eq!(
        (followed.len(), &distinct),
        (3, &primaries),
        "replicas follow"
    );
    // Clients are told the announced hostname.
    let slots = redis_cli(ports[0], &["cluster", "slots"]);
    assert!(slots.contains("127.0.0.1"), "{slots}");

    // A second `up` finds the cluster formed: the script creates nothing and
    // succeeds.
    let again = run_init_script(&script, &addresses);
    let output = String::from_utf8_lossy(&again.stdout) + String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "the second run failed:\n{output}");
    assert!(
        !output.contains("Performing hash slots allocation"),
        "{output}"
    );
    assert_eq!(
        redis_cli(ports[0], &["cluster", "nodes"]).lines().count(),
        6
    );
}
