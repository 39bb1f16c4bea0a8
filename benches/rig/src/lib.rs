//! What the rig binaries (`fastmock`, `loadgen`, `relayfloor`) share: a command line parsed the way the Python
//! rig's `argparse` parses it, so that `run.py` can start either rig with the same arguments, the file-descriptor
//! limit raised to its hard maximum, and the servers' listen-and-accept loop.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::exit;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// How many values an option takes (argparse's `nargs`/`action`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--name VALUE` (the last one given wins)
    One,
    /// `--name VALUE`, repeatable, every value kept (`action="append"`)
    Append,
    /// `--name [VALUE ...]` (`nargs="*"`; the last occurrence wins)
    Many,
}

/// One option: `--name`, its kind, its default (space-separated for [`Kind::Many`]; `None` = required for
/// [`Kind::One`]) and its help text.
pub struct Opt {
    pub name: &'static str,
    pub kind: Kind,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

pub const fn opt(name: &'static str, default: &'static str, help: &'static str) -> Opt {
    Opt {
        name,
        kind: Kind::One,
        default: Some(default),
        help,
    }
}

/// A [`Kind::One`] option with no default: the command line must give it.
pub const fn required(name: &'static str) -> Opt {
    Opt {
        name,
        kind: Kind::One,
        default: None,
        help: "",
    }
}

/// The parsed command line: option name (without `--`) to its values.
pub struct Args {
    prog: String,
    values: HashMap<&'static str, Vec<String>>,
}

impl Args {
    /// Parses `std::env::args()` against `opts`, as argparse would: `--name VALUE` or `--name=VALUE`, unique
    /// prefixes accepted (`allow_abbrev`), `-h`/`--help` prints the options; an error prints the usage and
    /// exits with status 2.
    pub fn parse(description: &str, opts: &[Opt]) -> Args {
        let mut argv = std::env::args();
        let prog = argv.next().unwrap_or_default();
        let prog = prog.rsplit('/').next().unwrap_or("").to_string();
        let argv: Vec<String> = argv.collect();
        let mut values: HashMap<&'static str, Vec<String>> = HashMap::new();
        let fail = |msg: String| -> ! {
            eprintln!("{}\n{prog}: error: {msg}", usage(&prog, opts));
            exit(2)
        };
        let mut i = 0;
        while i < argv.len() {
            let arg = &argv[i];
            i += 1;
            if arg == "-h" || arg == "--help" {
                println!(
                    "{}\n\n{description}\n\noptions:\n  -h, --help",
                    usage(&prog, opts)
                );
                for o in opts {
                    let default = o
                        .default
                        .map(|d| format!(" (default: {d})"))
                        .unwrap_or_default();
                    println!("  --{:<18} {}{default}", o.name, o.help);
                }
                exit(0)
            }
            let Some(flag) = arg.strip_prefix("--") else {
                fail(format!("unrecognized arguments: {arg}"))
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            let exact = opts.iter().find(|o| o.name == name);
            let o = match exact {
                Some(o) => o,
                None => {
                    let found: Vec<&Opt> = opts
                        .iter()
                        .filter(|o| !name.is_empty() && o.name.starts_with(name))
                        .collect();
                    match found.as_slice() {
                        [o] => *o,
                        [] => fail(format!("unrecognized arguments: {arg}")),
                        many => {
                            let names: Vec<String> =
                                many.iter().map(|o| format!("--{}", o.name)).collect();
                            fail(format!(
                                "ambiguous option: --{name} could match {}",
                                names.join(", ")
                            ))
                        }
                    }
                }
            };
            match o.kind {
                Kind::One | Kind::Append => {
                    let v = match inline {
                        Some(v) => v,
                        None if i < argv.len() && !looks_like_flag(&argv[i]) => {
                            i += 1;
                            argv[i - 1].clone()
                        }
                        None => fail(format!("argument --{}: expected one argument", o.name)),
                    };
                    let slot = values.entry(o.name).or_default();
                    if o.kind == Kind::One {
                        slot.clear();
                    }
                    slot.push(v);
                }
                Kind::Many => {
                    let mut vs: Vec<String> = Vec::new();
                    if let Some(v) = inline {
                        vs.push(v);
                    } else {
                        while i < argv.len() && !looks_like_flag(&argv[i]) {
                            vs.push(argv[i].clone());
                            i += 1;
                        }
                    }
                    values.insert(o.name, vs);
                }
            }
        }
        for o in opts {
            if !values.contains_key(o.name) {
                match (o.kind, o.default) {
                    (Kind::One, Some(d)) => {
                        values.insert(o.name, vec![d.to_string()]);
                    }
                    (Kind::One, None) => fail(format!(
                        "the following arguments are required: --{}",
                        o.name
                    )),
                    (_, d) => {
                        values.insert(
                            o.name,
                            d.unwrap_or("")
                                .split_whitespace()
                                .map(str::to_string)
                                .collect(),
                        );
                    }
                }
            }
        }
        Args { prog, values }
    }

    /// Prints `msg` the way argparse's `parser.error` does and exits with status 2.
    pub fn error(&self, msg: &str) -> ! {
        eprintln!("usage: {} ...\n{}: error: {msg}", self.prog, self.prog);
        exit(2)
    }

    pub fn str(&self, name: &str) -> &str {
        self.values
            .get(name)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn list(&self, name: &str) -> &[String] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn f64(&self, name: &str) -> f64 {
        let v = self.str(name);
        parse_float(v).unwrap_or_else(|| {
            self.error(&format!("argument --{name}: invalid float value: '{v}'"))
        })
    }

    pub fn i64(&self, name: &str) -> i64 {
        let v = self.str(name);
        parse_int(v)
            .unwrap_or_else(|| self.error(&format!("argument --{name}: invalid int value: '{v}'")))
    }

    /// `--host` and `--port` (both binaries have them) resolved to one address; a port out of range is a usage
    /// error, as argparse would make it.
    pub fn socket_addr(&self) -> io::Result<SocketAddr> {
        self.socket_addr_of("host", "port")
    }

    /// The address given by the options `host` and `port` (e.g. `upstream-host`, `upstream-port`).
    pub fn socket_addr_of(&self, host: &str, port: &str) -> io::Result<SocketAddr> {
        let name = self.str(host);
        let Ok(number) = u16::try_from(self.i64(port)) else {
            self.error(&format!("argument --{port}: out of range"))
        };
        (name, number).to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no address for {name}"))
        })
    }

    pub fn f64s(&self, name: &str) -> Vec<f64> {
        self.list(name)
            .iter()
            .map(|v| {
                parse_float(v).unwrap_or_else(|| {
                    self.error(&format!("argument --{name}: invalid float value: '{v}'"))
                })
            })
            .collect()
    }

    pub fn i64s(&self, name: &str) -> Vec<i64> {
        self.list(name)
            .iter()
            .map(|v| {
                parse_int(v).unwrap_or_else(|| {
                    self.error(&format!("argument --{name}: invalid int value: '{v}'"))
                })
            })
            .collect()
    }
}

/// argparse takes `-5` as a value (a negative number), anything else starting with `-` as an option.
fn looks_like_flag(s: &str) -> bool {
    s.starts_with('-')
        && s.len() > 1
        && !s[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.')
}

fn usage(prog: &str, opts: &[Opt]) -> String {
    let parts: Vec<String> = opts
        .iter()
        .map(|o| {
            let metavar = o.name.to_uppercase().replace('-', "_");
            match (o.kind, o.default) {
                (Kind::One, None) => format!("--{} {metavar}", o.name),
                (Kind::Many, _) => format!("[--{} [{metavar} ...]]", o.name),
                _ => format!("[--{} {metavar}]", o.name),
            }
        })
        .collect();
    format!("usage: {prog} [-h] {}", parts.join(" "))
}

/// Python's `int(str)`: surrounding whitespace allowed, underscores between digits allowed.
pub fn parse_int(s: &str) -> Option<i64> {
    let t = s.trim();
    if t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    t.replace('_', "").parse().ok()
}

/// Python's `float(str)` for the forms a command line carries (`20`, `0.5`, `1e3`, `inf`).
pub fn parse_float(s: &str) -> Option<f64> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" | "+nan" | "-nan" => Some(f64::NAN),
        _ => t.parse().ok(),
    }
}

/// Raises the soft open-file limit to the hard one (thousands of sockets; `run.py` does the same for its children).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Listens on `addr` (queue `backlog`), prints `{what} listening on http://{host}:{port}{note}` once bound, and
/// runs `serve` on every accepted connection (TCP_NODELAY set) as a task of the current `LocalSet`. Never returns
/// but on a listen error.
pub async fn listen_and_serve<F, Fut>(
    addr: SocketAddr,
    backlog: u32,
    what: &str,
    note: &str,
    mut serve: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    let listener = sock.listen(backlog)?;
    let port = listener.local_addr()?.port();
    let mut out = io::stdout();
    writeln!(out, "{what} listening on http://{}:{port}{note}", addr.ip())?;
    out.flush()?;
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::task::spawn_local(serve(s));
            }
            // out of file descriptors, say: wait for some to be freed rather than spin
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
