"""Real and RFC-modelled session descriptions shared by the SDP tests."""

from __future__ import annotations


def crlf(text: str) -> bytes:
    return "".join(line + "\r\n" for line in text.strip().splitlines()).encode()


# Shape of the offer SIPp's built-in uac_pcap scenario sends (sip-tester 3.6.1, fields substituted).
SIPP_OFFER = crlf(
    """
v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 8 101
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-11,16
"""
)

# A real offer of baresip 1.0.0 (Debian baresip-core; net_interface 127.0.0.1, audio_codecs=PCMU),
# captured by tests/system/test_harness_peers.py.
BARESIP_OFFER = crlf(
    """
v=0
o=- 2862536714 1462864814 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
a=tool:baresip 1.0.0
m=audio 58110 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:2932507996 cname:sip:1001@127.0.0.1:58663
a=minptime:20
a=ptime:20
"""
)

# Modelled on RFC 3264 section 10.1 (audio + video offer; note the empty s= line).
RFC3264_OFFER = crlf(
    """
v=0
o=alice 2890844526 2890844526 IN IP4 host.atlanta.example.com
s=
c=IN IP4 host.atlanta.example.com
t=0 0
m=audio 49170 RTP/AVP 0 8 97
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:97 iLBC/8000
m=video 51372 RTP/AVP 31 32
a=rtpmap:31 H261/90000
a=rtpmap:32 MPV/90000
"""
)

# The recording-bridge offer of docs/ARCHITECTURE.md: caller line + callee placeholder.
BRIDGE_OFFER = crlf(
    """
v=0
o=callvault 42 42 IN IP4 10.0.0.5
s=-
t=0 0
m=audio 40000 RTP/AVP 0 101
c=IN IP4 192.0.2.10
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=label:caller
m=audio 9 RTP/AVP 0 101
c=IN IP4 0.0.0.0
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=label:callee
"""
)

EXAMPLES = [SIPP_OFFER, BARESIP_OFFER, RFC3264_OFFER, BRIDGE_OFFER]
