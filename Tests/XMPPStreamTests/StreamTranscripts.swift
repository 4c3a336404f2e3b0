/// Real-world stream transcripts, one direction each, used by the split-point tests.
enum StreamTranscripts {
    /// What a server receives from a client during a login in the style Prosody and
    /// ejabberd see from Conversations or Gajim, after TLS: SCRAM, bind, roster, presence
    /// and chat with Unicode, keepalives, CDATA and references, then the close.
    static let clientLogin = """
    <?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en'>\
    <auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>biwsbj1qdWxpZXQscj1vTXNUQUF3QUFBQU1BQUFBTlAwVEFBQUFBQUJQVTBBQQ==</auth>
    <response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>Yz1iaXdzLHI9b01zVEFBd0FBQUFNQUFBQU5QMFRBQUFBQUFCUFUwQUFlMTI0Njk1Yi02OWE5LTRkZTYtOWMzMC1iNTFiMzgwOGM1OWUscD1VQTU3dE0vU3ZwQVRCa0gyRlhzMFdEWHZKWXc9</response>
    <iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>Gajim.Ω</resource></bind></iq>
    <iq type='get' id='roster_1'><query xmlns='jabber:iq:roster' ver=''/></iq>\
    <presence><show>chat</show><status>Ich bin heute in München 🎉 — ça va?</status><priority>5</priority><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://gajim.org' ver='QZ2tWjKEZh2sdsRb8Mn4JXy0Pdk='/></presence>  \t
    <message to='romeo@example.net/orchard' type='chat' id='m&amp;1' xml:lang='fr'><body>Wherefore art thou, Romeo? 你好，世界 𝄞 &lt;3 &#x1F600; &#233;</body><active xmlns='http://jabber.org/protocol/chatstates'/><x:data xmlns:x='urn:example:prefixed' x:kind='prefixed'><x:item>keep prefixes out of the tree</x:item></x:data></message>
    <message to='nurse@example.com' id='m2'><body><![CDATA[<not> & markup]]></body><thread>e0ffe42b28561960c6b12b944a092794b9683a38</thread></message>\
    <iq type='get' id='ping-1' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>  \
    <r xmlns='urn:xmpp:sm:3'/>
    </stream:stream>
    """

    /// What a client receives from an ejabberd-style server: header with id, features,
    /// a SASL challenge and success, a roster push and a message with nested payloads.
    static let serverToClient = """
    <?xml version='1.0'?><stream:stream id='3178429564513398112' version='1.0' xml:lang='en' xmlns:stream='http://etherx.jabber.org/streams' from='example.com' xmlns='jabber:client'>\
    <stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism></mechanisms><register xmlns='http://jabber.org/features/iq-register'/></stream:features>\
    <challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>cj1vTXNUQUF3QUFBQU1BQUFBTlAwVEFBQUFBQUJQVTBBQWUxMjQ2OTViLTY5YTktNGRlNi05YzMwLWI1MWIzODA4YzU5ZSxzPU5qaGtZVE0wTURndE5HWTBaaTAwTmpreExUazNOVEF0TlRSaU5tVTBaakU1TTJGaSxpPTQwOTY=</challenge>\
    <success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>dj1wTk5ERlZFUXh1WHhDb1NFaVc4R0VaKzFSU289</success>\
    <iq type='set' id='push1' to='juliet@example.com/balcony'><query xmlns='jabber:iq:roster' ver='ver34'><item jid='nurse@example.com' name='Nurse — Ñaña' subscription='both'><group>Servants</group></item></query></iq>\
    <message from='juliet@example.com' to='juliet@example.com/balcony' type='chat'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' from='romeo@example.net/orchard' to='juliet@example.com/balcony' type='chat'><body>Привет 👋🏽</body></message></forwarded></received></message>\
    <stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>Replaced by new connection</text></stream:error></stream:stream>
    """

    /// An incoming server stream (what Braid reads from a Prosody peer) with dialback.
    static let serverToServer = """
    <?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' from='capulet.example' to='montague.example' version='1.0' xml:lang='en'>\
    <db:result from='capulet.example' to='montague.example'>b4835385f37fe2895af6c196b59097b16862406db80559900d596f8c8d6a7d5e</db:result>\
    <db:verify from='capulet.example' to='montague.example' id='417GAF25'>37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643</db:verify>\
    <presence from='juliet@capulet.example/balcony' to='romeo@montague.example' type='subscribe'/>\
    <message from='juliet@capulet.example/balcony' to='romeo@montague.example' type='chat' id='ktx72v49'><body>Art thou not Romeo, and a Montague? 🌹</body></message>\
    <iq from='capulet.example' to='montague.example' id='s2s-ping' type='get'><ping xmlns='urn:xmpp:ping'/></iq>\
    <a xmlns='urn:xmpp:sm:3' h='4'/></stream:stream>
    """
}
