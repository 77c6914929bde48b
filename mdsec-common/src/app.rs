//! Application identities. The payload classifier arrives with the discovery work;
//! until then every flow's app is `Unknown`, and rules that require an app deny
//! at the first payload (the handshake passes).

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum App {
    Unknown = 0,
    Dicom = 1,
    Hl7 = 2,
    Tls = 3,
    Http = 4,
    Dns = 5,
    Dhcp = 6,
    Ssh = 7,
    Telnet = 8,
    Smb = 9,
    Rdp = 10,
    Ntp = 11,
    Snmp = 12,
    Syslog = 13,
    Mdns = 14,
    Ssdp = 15,
    WsDiscovery = 16,
    Mqtt = 17,
    Modbus = 18,
}

impl App {
    pub const ALL: &'static [App] = &[
        App::Unknown,
        App::Dicom,
        App::Hl7,
        App::Tls,
        App::Http,
        App::Dns,
        App::Dhcp,
        App::Ssh,
        App::Telnet,
        App::Smb,
        App::Rdp,
        App::Ntp,
        App::Snmp,
        App::Syslog,
        App::Mdns,
        App::Ssdp,
        App::WsDiscovery,
        App::Mqtt,
        App::Modbus,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            App::Unknown => "unknown",
            App::Dicom => "dicom",
            App::Hl7 => "hl7",
            App::Tls => "tls",
            App::Http => "http",
            App::Dns => "dns",
            App::Dhcp => "dhcp",
            App::Ssh => "ssh",
            App::Telnet => "telnet",
            App::Smb => "smb",
            App::Rdp => "rdp",
            App::Ntp => "ntp",
            App::Snmp => "snmp",
            App::Syslog => "syslog",
            App::Mdns => "mdns",
            App::Ssdp => "ssdp",
            App::WsDiscovery => "ws-discovery",
            App::Mqtt => "mqtt",
            App::Modbus => "modbus",
        }
    }

    pub fn from_u8(v: u8) -> App {
        App::ALL.get(v as usize).copied().unwrap_or(App::Unknown)
    }

    pub fn from_name(s: &str) -> Option<App> {
        App::ALL.iter().copied().find(|a| a.name() == s)
    }
}
