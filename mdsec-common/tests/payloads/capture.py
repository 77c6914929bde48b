import socket, subprocess, threading, sys, time, os
out = "/work/main/mdsec-common/tests/payloads"
def tcp_capture(name, cmd_fmt, reply=None):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
    port = s.getsockname()[1]
    data = {}
    def srv():
        c, _ = s.accept()
        c.settimeout(3)
        if reply: c.sendall(reply)
        try: data["d"] = c.recv(4096)
        except Exception as e: data["d"] = b""
        c.close()
    t = threading.Thread(target=srv); t.start()
    p = subprocess.Popen(cmd_fmt.format(port=port), shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t.join(5)
    try: p.kill()
    except: pass
    d = data.get("d", b"")
    open(f"{out}/{name}.hex","w").write(d.hex()+"\n")
    print(name, len(d), d[:40])
def udp_capture(name, cmd_fmt):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); s.settimeout(5)
    port = s.getsockname()[1]
    p = subprocess.Popen(cmd_fmt.format(port=port), shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = s.recv(4096)
    try: p.kill()
    except: pass
    open(f"{out}/{name}.hex","w").write(d.hex()+"\n")
    print(name, len(d), d[:40])
tcp_capture("dicom-associate-rq", "echoscu -aet PUMP-GW -aec PACS 127.0.0.1 {port}")
tcp_capture("tls-client-hello", "openssl s_client -connect 127.0.0.1:{port} </dev/null")
tcp_capture("http-get", "curl -s http://127.0.0.1:{port}/worklist")
tcp_capture("ssh-banner", "ssh -o StrictHostKeyChecking=no -o BatchMode=yes -p {port} 127.0.0.1")
tcp_capture("mqtt-connect", "mosquitto_pub -h 127.0.0.1 -p {port} -t ward/3/pump/7 -m status")
udp_capture("dns-query", "dig +tries=1 +time=2 @127.0.0.1 -p {port} pacs.hospital.example")
udp_capture("snmp-get", "snmpget -v2c -c public -r 0 -t 2 127.0.0.1:{port} 1.3.6.1.2.1.1.1.0")
udp_capture("syslog", "logger --server 127.0.0.1 --port {port} --udp 'pump 7: occlusion alarm cleared'")
import socket, subprocess, time, struct
out = "/work/main/mdsec-common/tests/payloads"
rq = bytes.fromhex(open(f"{out}/dicom-associate-rq.hex").read().strip())
p = subprocess.Popen(["storescp", "--fork", "-od", "/tmp", "11199"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
c = socket.create_connection(("127.0.0.1", 11199)); c.sendall(rq); c.settimeout(3)
ac = c.recv(4096); c.close(); p.kill(); p.wait()
open(f"{out}/dicom-associate-ac.hex","w").write(ac.hex()+"\n"); print("ac", ac[:12])
def w(name, b): open(f"{out}/{name}.hex","w").write(b.hex()+"\n"); print(name, len(b))
# HL7 v2.5 ORU over MLLP (0x0B ... 0x1C 0x0D), as infusion pumps send to pharmacy systems.
msg = b"MSH|^~\\&|PUMP|WARD3|PHARMACY|HOSP|20261123094700||ORU^R01^ORU_R01|MSG00017|P|2.5\rPID|||123456^^^HOSP^MR||DOE^JANE\rOBX|1|NM|RATE^Infusion rate||12.5|mL/h|||||F\r"
w("hl7-mllp", b"\x0b" + msg + b"\x1c\x0d")
# SMB2 NEGOTIATE over NetBIOS session service (MS-SMB2 2.2.1 / 2.2.3).
smb2 = b"\xfeSMB" + struct.pack("<HHIHHIIQIIQ16s", 64, 0, 0, 0, 0, 0, 0, 0, 0xfeff, 0, 0, b"\0"*16)
neg = struct.pack("<HHHHI16sIHH", 36, 2, 1, 0, 0x7f, b"\x11"*16, 0, 0, 0) + struct.pack("<HH", 0x0202, 0x0210)
w("smb2-negotiate", b"\x00" + struct.pack(">I", len(smb2+neg))[1:] + smb2 + neg)
# SMB1 NEGOTIATE (MS-CIFS 2.2.4.52).
smb1 = b"\xffSMB\x72" + b"\0"*4 + b"\x18\x01\x28" + b"\0"*22 + b"\x00\x0c\x00\x02NT LM 0.12\x00"
w("smb1-negotiate", b"\x00" + struct.pack(">I", len(smb1))[1:] + smb1)
# RDP: TPKT + X.224 Connection Request with routing cookie and RDP_NEG_REQ (MS-RDPBCGR 2.2.1.1).
cookie = b"Cookie: mstshash=biomed\r\n"
neg_req = b"\x01\x00\x08\x00\x03\x00\x00\x00"
x224 = bytes([6 + len(cookie) + len(neg_req), 0xe0, 0, 0, 0, 0, 0]) + cookie + neg_req
w("rdp-connection-request", b"\x03\x00" + struct.pack(">H", 4 + len(x224)) + x224)
# Telnet client option negotiation (RFC 854/1091): IAC DO SUPPRESS-GO-AHEAD, IAC WILL TERMINAL-TYPE.
w("telnet-negotiation", b"\xff\xfd\x03\xff\xfb\x18\xff\xfb\x1f")
# NTPv4 client request (RFC 5905): LI 0, VN 4, mode 3.
w("ntp-client", bytes([0x23]) + b"\0"*39 + struct.pack(">Q", 0xead3c1e5a7b2c000))
# DHCPDISCOVER (RFC 2131): op 1, htype 1, hlen 6; magic cookie; options 53, 12, 55, 60, 61.
mac = bytes.fromhex("00095d1a2b3c")
dhcp = bytes([1, 1, 6, 0]) + struct.pack(">IHH", 0x3903f326, 0, 0x8000) + b"\0"*16 + mac + b"\0"*10 + b"\0"*192
dhcp += bytes([99, 130, 83, 99, 53, 1, 1, 12, 6]) + b"pump07" + bytes([55, 4, 1, 3, 6, 15, 60, 8]) + b"Alaris-8" + bytes([61, 7, 1]) + mac + b"\xff"
w("dhcp-discover", dhcp)
# mDNS query for _dicom._tcp.local (RFC 6762), sent to 5353.
q = b"\x06_dicom\x04_tcp\x05local\x00\x00\x0c\x00\x01"
w("mdns-query", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00" + q)
# SSDP M-SEARCH (UPnP Device Architecture 1.1).
w("ssdp-msearch", b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 2\r\nST: ssdp:all\r\n\r\n")
# WS-Discovery Probe (SOAP over UDP 3702), as IEEE 11073 SDC devices use.
w("wsd-probe", b'<?xml version="1.0" encoding="UTF-8"?><s12:Envelope xmlns:s12="http://www.w3.org/2003/05/soap-envelope" xmlns:wsa="http://www.w3.org/2005/08/addressing" xmlns:wsd="http://docs.oasis-open.org/ws-dd/ns/discovery/2009/01"><s12:Header><wsa:Action>http://docs.oasis-open.org/ws-dd/ns/discovery/2009/01/Probe</wsa:Action></s12:Header><s12:Body><wsd:Probe/></s12:Body></s12:Envelope>')
# Modbus/TCP: MBAP (transaction 1, protocol 0, length 6, unit 1) + read holding registers.
w("modbus-read", struct.pack(">HHHB", 1, 0, 6, 1) + bytes([3, 0, 0, 0, 10]))
# TLS ClientHello with SNI, as Python's ssl module sends it (OpenSSL underneath).
import socket, ssl, threading
out = "/work/main/mdsec-common/tests/payloads"
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1); port = s.getsockname()[1]
data = {}
def srv():
    c, _ = s.accept(); c.settimeout(3); data["d"] = c.recv(4096); c.close()
t = threading.Thread(target=srv); t.start()
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
try:
    ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="pacs.hospital.example")
except Exception: pass
t.join()
open(f"{out}/tls-client-hello-sni.hex", "w").write(data["d"].hex() + "\n"); print(len(data["d"]))
# Later captures and spec-built payloads (app-ID gaps found replaying public captures).
tcp_capture("dns-tcp-query", "dig +tcp +tries=1 +time=1 -p {port} @127.0.0.1 pump1.ward3.hospital.example A")
tcp_capture("syslog-tcp-octet-counting", "logger --tcp --octet-count --server 127.0.0.1 --port {port} -t pump1 'infusion started'")
tcp_capture("syslog-tcp-non-transparent", "logger --tcp --server 127.0.0.1 --port {port} -t pump1 'infusion started'")
# ntp-control: `ntpq -c rv 127.0.0.1` captured on UDP 127.0.0.1:123 (ntpq takes no port).
import struct
# Built from the specifications.
# TLS 1.2 application_data record seen mid-connection (RFC 5246 6.2.1).
w("tls-application-data", b"\x17\x03\x03\x00\x30" + bytes(range(48)))
# mDNS announcement: response, authoritative, no question, one PTR answer (RFC 6762 8.3).
ans = b"\x06_dicom\x04_tcp\x05local\x00" + b"\x00\x0c\x00\x01" + struct.pack(">IH", 4500, 8) + b"\x05pacs1\xc0\x0c"
w("mdns-announcement", b"\x00\x00\x84\x00\x00\x00\x00\x01\x00\x00\x00\x00" + ans)
# SSDP reply to an M-SEARCH (UPnP Device Architecture 1.1, 1.3.3).
w("ssdp-reply", b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=1800\r\nEXT:\r\nLOCATION: http://10.20.0.31:49152/desc.xml\r\nSERVER: Linux/4.9 UPnP/1.1 monitor/2.0\r\nST: upnp:rootdevice\r\nUSN: uuid:2f4f0b52::upnp:rootdevice\r\n\r\n")
# RDP over UDP: the client's SYN datagram (MS-RDPEUDP 2.2.2.1, 3.1.5.1.1), padded to 1232.
syn = struct.pack(">IHH", 0xffffffff, 64, 0x0001 | 0x0004) + struct.pack(">IHH", 0x12345678, 1232, 1232)
w("rdp-udp-syn", syn + b"\0" * (1232 - len(syn)))
# NetBIOS session request to *SMBSERVER (RFC 1002 4.3.2), as SMB clients open port 139.
def nb(name):
    name = name.ljust(15)[:15].encode() + b"\x20"
    return b"\x20" + bytes(c for b in name for c in (0x41 + (b >> 4), 0x41 + (b & 15))) + b"\x00"
body = nb("*SMBSERVER") + nb("WORKSTATION")
w("netbios-session-request", b"\x81\x00" + struct.pack(">H", len(body)) + body)
# MQTT PINGREQ (MQTT 3.1.1 3.12): a flow first seen after its CONNECT.
w("mqtt-pingreq", b"\xc0\x00")
tcp_capture("fhir-search", "curl -s 'http://127.0.0.1:{port}/fhir/R4/Patient?identifier=MRN%7C123456'")
