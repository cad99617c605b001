//! `tidings up --config <file>`: a TOML file whose keys are `up`'s long flag names. Its values
//! become the flags' defaults, so clap itself layers them: built-in default < file < env < flag.
//! An unknown key, a value of the wrong type or an unreadable file is a refusal like any other.

use clap::builder::ValueParser;
use clap::{ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::path::Path;
use toml_edit::{Item, Value};

/// The flag (and key-less argument id) naming the file; the file cannot name another.
pub const CONFIG: &str = "config";

/// What reading the config file found: refusals, reported with every other setting's, and
/// warnings for the log.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// The file's values for one flag, checked by the flag's own parser.
struct Entry {
    id: String,
    values: Vec<String>,
}

/// Parses `argv` like `C::parse_from`; when the subcommand `up` names a config file, parses it
/// again with the file's accepted values as the defaults of their flags. Exits as clap does on
/// `--help` or a malformed command line.
pub fn parse_from<C: CommandFactory + FromArgMatches>(argv: Vec<OsString>) -> (C, Report) {
    let cmd = C::command();
    let matches = cmd.clone().get_matches_from(argv.clone());
    let path = match matches.subcommand() {
        Some(("up", up)) => up.get_one::<std::path::PathBuf>(CONFIG).cloned(),
        _ => None,
    };
    let Some(path) = path else { return (from_matches(&matches), Report::default()) };
    let up = cmd.find_subcommand("up").expect("`up` is a subcommand").clone();
    let (entries, report) = read(&path, &up);
    let cmd = cmd.mut_subcommand("up", |mut up| {
        for e in entries {
            up = up.mut_arg(e.id, |a| a.default_values(e.values));
        }
        up
    });
    (from_matches(&cmd.get_matches_from(argv)), report)
}

fn from_matches<C: FromArgMatches>(matches: &ArgMatches) -> C {
    C::from_arg_matches(matches).unwrap_or_else(|e| e.exit())
}

/// The file's entries that `up` accepts, and a refusal for each key or value it does not.
fn read(path: &Path, up: &Command) -> (Vec<Entry>, Report) {
    let mut report = Report::default();
    let name = format!("--config (TIDINGS_CONFIG) {}", path.display());
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            report.errors.push(format!("{name}: cannot read it: {e}"));
            return (Vec::new(), report);
        }
    };
    let doc = match text.parse::<toml_edit::Document<String>>() {
        Ok(d) => d,
        Err(e) => {
            report.errors.push(format!("{name}: not valid TOML: {}", e.to_string().trim_end().replace('\n', "\n    ")));
            return (Vec::new(), report);
        }
    };
    let mut entries = Vec::new();
    let mut secrets = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let arg = up.get_arguments().find(|a| a.get_long() == Some(key) && a.get_id() != CONFIG);
        let Some(arg) = arg else {
            report.errors.push(format!(
                "{name}: unknown key `{key}` (the keys are the long flags of `tidings up --help`, without the dashes)"
            ));
            continue;
        };
        match values(arg, item).and_then(|values| check(up, arg, values)) {
            Ok(values) => {
                if arg.is_hide_env_values_set() {
                    secrets.push(key.to_string());
                }
                entries.push(Entry { id: arg.get_id().to_string(), values });
            }
            Err(e) => report.errors.push(format!("{name}: `{key}` {e}")),
        }
    }
    if let Some(w) = readable_by_all(path, &secrets) {
        report.warnings.push(w);
    }
    (entries, report)
}

/// The file's value as the strings a flag would take: a list for a repeatable flag, `true` or
/// `false` for a switch, one string, integer or float otherwise.
fn values(arg: &clap::Arg, item: &Item) -> Result<Vec<String>, String> {
    let value = item.as_value().ok_or_else(|| format!("is a {}; expected a value", item.type_name()))?;
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            Value::Boolean(b) => Ok(vec![b.value().to_string()]),
            v => Err(format!("is a {}; expected true or false", v.type_name())),
        },
        ArgAction::Append => match value {
            Value::Array(list) => list.iter().map(scalar).collect(),
            v => Err(format!("is a {}; expected an array (e.g. [\"a\", \"b\"])", v.type_name())),
        },
        _ => scalar(value).map(|v| vec![v]),
    }
}

fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.value().clone()),
        Value::Integer(i) => Ok(i.value().to_string()),
        Value::Float(f) => Ok(f.value().to_string()),
        v => Err(format!("holds a {}; expected a string or a number", v.type_name())),
    }
}

/// Runs the flag's own parser over the values, as if they were given on the command line (no
/// env var), so a value the flag would refuse is refused here with clap's reason.
fn check(up: &Command, arg: &clap::Arg, values: Vec<String>) -> Result<Vec<String>, String> {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return Ok(values);
    }
    let long = arg.get_long().unwrap_or_default();
    let probe = Command::new(up.get_name().to_string()).arg(arg.clone().env(None)).no_binary_name(true);
    let argv: Vec<String> = values.iter().map(|v| format!("--{long}={v}")).collect();
    match probe.try_get_matches_from(argv) {
        Ok(_) => Ok(values),
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            Err(format!("is refused: {}", first.trim_start_matches("error: ")))
        }
    }
}

/// A warning when a file holding secrets can be read by every user of the machine.
fn readable_by_all(path: &Path, secrets: &[String]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (!secrets.is_empty() && mode & 0o004 != 0).then(|| {
        format!(
            "{} holds secrets ({}) and every user of this machine can read it; `chmod 600` it",
            path.display(),
            secrets.join(", ")
        )
    })
}

/// A config file for `up` with every key commented out at its default, under its flag's help
/// and env var: `tidings config-example`, and docs/configuration.md's reference of the keys.
pub fn example(up: &Command) -> String {
    let mut out = String::from(
        "# tidings.toml: settings of `tidings up --config tidings.toml` (or TIDINGS_CONFIG).\n\
         # Each key is a long flag of `tidings up` without the dashes; a repeatable flag takes an\n\
         # array. The file replaces the built-in defaults below; env vars and flags win over it.\n",
    );
    for arg in up.get_arguments() {
        let Some(long) = arg.get_long().filter(|l| !["help", CONFIG].contains(l)) else { continue };
        out.push('\n');
        let help = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
        for line in wrap(&help, 96) {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        if arg.is_hide_env_values_set() {
            out.push_str(&format!("# env: {env}. A secret: keep the file private (chmod 600).\n"));
        } else if !env.is_empty() {
            out.push_str(&format!("# env: {env}\n"));
        }
        out.push_str(&format!("# {long} = {}\n", example_value(arg)));
    }
    out
}

/// The flag's default as a TOML value, or a placeholder naming the value when it has none.
fn example_value(arg: &clap::Arg) -> String {
    let defaults: Vec<String> = arg.get_default_values().iter().map(|d| d.to_string_lossy().into_owned()).collect();
    let placeholder = || {
        let name = arg.get_value_names().and_then(|n| n.first()).map(|n| n.to_string()).unwrap_or_default();
        format!("\"<{name}>\"")
    };
    let textual = [ValueParser::string().type_id(), ValueParser::path_buf().type_id()];
    let quote = |v: &str| match v.parse::<f64>() {
        Ok(_) if !textual.contains(&arg.get_value_parser().type_id()) => v.to_string(),
        _ => format!("{v:?}"),
    };
    match arg.get_action() {
        ArgAction::SetTrue => "false".into(),
        ArgAction::Append => {
            let delimiter = arg.get_value_delimiter();
            let items: Vec<String> = defaults
                .iter()
                .flat_map(|d| match delimiter {
                    Some(c) => d.split(c).map(str::to_string).collect(),
                    None => vec![d.clone()],
                })
                .map(|v| quote(&v))
                .collect();
            match items.is_empty() {
                true => format!("[{}]", placeholder()),
                false => format!("[{}]", items.join(", ")),
            }
        }
        _ => defaults.first().map(|d| quote(d)).unwrap_or_else(placeholder),
    }
}

/// `text`'s paragraphs as lines of at most `width` characters (a longer word stays whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            lines.push(String::new());
        }
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command as Sub};

    /// Env vars are process-wide: the tests that set one take turns.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn up(file: &str, flags: &[&str]) -> (crate::up::UpArgs, Report) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = ["tidings", "up", "--config"].map(OsString::from).into();
        argv.push(path.into_os_string());
        argv.extend(flags.iter().map(OsString::from));
        match parse_from::<Cli>(argv) {
            (Cli { command: Sub::Up(args) }, report) => (args, report),
            _ => unreachable!("parsed `up`"),
        }
    }

    /// Built-in default < file < env var < flag, for a scalar, a list and a switch.
    #[test]
    fn the_file_beats_defaults_env_beats_the_file_and_flags_beat_env() {
        let _turn = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let file = "grace-secs = 7\nstages = [\"templating\", \"gateway\"]\ncookie-secure = true\n\
                    http = \"127.0.0.1:9999\"\nchat-write-rate = 2.5\n";
        std::env::remove_var("TIDINGS_GRACE_SECS");
        let (defaults, _) = up("", &[]);
        assert_eq!((defaults.grace_secs, defaults.sse.cookie_secure), (15, false));

        let (args, report) = up(file, &[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(args.grace_secs, 7);
        assert_eq!(args.stages, ["templating", "gateway"]);
        assert!(args.sse.cookie_secure);
        assert_eq!(args.http.to_string(), "127.0.0.1:9999");
        assert_eq!(args.chat.chat_write_rate, 2.5);

        std::env::set_var("TIDINGS_GRACE_SECS", "8");
        let (args, _) = up(file, &[]);
        assert_eq!(args.grace_secs, 8, "the env var did not beat the file");
        let (args, _) = up(file, &["--grace-secs", "9", "--stages", "persistence"]);
        assert_eq!(args.grace_secs, 9, "the flag did not beat the env var");
        assert_eq!(args.stages, ["persistence"], "the flag did not replace the file's list");
        std::env::remove_var("TIDINGS_GRACE_SECS");
    }

    /// Unknown keys and values of the wrong type are refused, each named; the keys beside them
    /// still count.
    #[test]
    fn unknown_keys_and_wrong_types_are_refused_together() {
        let _turn = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let file = "grace-secs = 3\nhtpp = \"127.0.0.1:1\"\nhttp = 8080\ndev = \"yes\"\n\
                    stages = \"templating\"\nmax-connections = -1\nconfig = \"other.toml\"\n[jwt]\nsecret = \"x\"\n";
        let (args, report) = up(file, &[]);
        assert_eq!(args.grace_secs, 3);
        let all = report.errors.join("\n");
        for named in
            ["unknown key `htpp`", "`http`", "`dev`", "`stages`", "`max-connections`", "key `config`", "key `jwt`"]
        {
            assert!(all.contains(named), "{named} not reported:\n{all}");
        }
        assert_eq!(report.errors.len(), 7, "{all}");
        assert!(all.contains("--config (TIDINGS_CONFIG)"), "{all}");
    }

    #[test]
    fn a_malformed_or_missing_file_is_refused() {
        let (_, report) = up("http = \"127.0.0.1:1\"\nstages = [\"templating\"\n", &[]);
        assert!(report.errors.len() == 1 && report.errors[0].contains("not valid TOML"), "{:?}", report.errors);
        let argv = ["tidings", "up", "--config", "/nonexistent/tidings.toml"].map(OsString::from).into();
        let (_, report) = parse_from::<Cli>(argv);
        assert!(report.errors.len() == 1 && report.errors[0].contains("cannot read"), "{:?}", report.errors);
    }

    #[test]
    fn secrets_in_a_world_readable_file_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tidings.toml");
        std::fs::write(&path, "ingest-token = [\"svc-orders-7f3c9a1e5b2d\"]\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let up = Cli::command().find_subcommand("up").unwrap().clone();
        let (entries, report) = read(&path, &up);
        assert_eq!(entries.len(), 1);
        assert!(report.warnings.len() == 1 && report.warnings[0].contains("ingest-token"), "{:?}", report.warnings);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read(&path, &up).1.warnings.is_empty());
    }

    /// Every key of the example, uncommented, is accepted and gives `up` its built-in defaults.
    #[test]
    fn the_example_names_every_key_at_its_default() {
        let _turn = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let cmd = Cli::command();
        let up_cmd = cmd.find_subcommand("up").unwrap();
        let text = example(up_cmd);
        let keys: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# ")).filter(|l| l.contains(" = ")).collect();
        let flags = up_cmd.get_arguments().filter(|a| a.get_long().is_some_and(|l| !["help", CONFIG].contains(&l)));
        assert_eq!(keys.len(), flags.count(), "{text}");
        // Placeholders stand for values that have no default: leave those keys out.
        let file: String = keys.iter().filter(|l| !l.contains("\"<")).map(|l| format!("{l}\n")).collect();
        let (mut args, report) = up(&file, &[]);
        assert!(report.errors.is_empty(), "{:?}\n{file}", report.errors);
        let (mut defaults, _) = up("", &[]);
        (args.config, defaults.config) = (None, None);
        assert_eq!(format!("{args:?}"), format!("{defaults:?}"));
    }

    /// The hand-written examples of docs/configuration.md are files `up` accepts.
    #[test]
    fn the_documented_examples_are_accepted() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = doc.lines().collect();
        let up = Cli::command().find_subcommand("up").unwrap().clone();
        let dir = tempfile::tempdir().unwrap();
        let mut checked = 0;
        for (i, _) in lines.iter().enumerate().filter(|(_, l)| l.trim() == "```toml") {
            if i > 0 && lines[i - 1].contains("<!-- generated:") {
                continue;
            }
            let body: Vec<&str> = lines[i + 1..].iter().take_while(|l| l.trim() != "```").copied().collect();
            let file = dir.path().join(format!("example-{i}.toml"));
            std::fs::write(&file, body.join("\n")).unwrap();
            let (entries, report) = read(&file, &up);
            assert!(report.errors.is_empty(), "the example at line {} is refused: {:?}", i + 1, report.errors);
            assert!(!entries.is_empty(), "the example at line {} sets nothing", i + 1);
            checked += 1;
        }
        assert!(checked > 0, "docs/configuration.md has no hand-written config file example");
    }
}
