// A stand-in for XStream's NoTypePermission, for Debian's JMeter 2.13 only.
//
// Debian 12 ships JMeter 2.13 with XStream 1.4.20, whose allow-list security
// (XStream 1.4.18 and later) denies every class JMeter 2.13 does not know to
// allow, so `jmeter -n -t plan.jmx` fails at once with
// "ForbiddenClassException: org.apache.jmeter.save.ScriptWrapper".
// loadtest/jmeter/run.sh compiles this class and puts it ahead of xstream.jar
// on the class path (JAVA_CLASSPATH, honoured by Debian's java-wrappers), so
// the permission XStream puts last, NONE, allows every type, as XStream did
// before 1.4.18. That JVM only reads our own test plan. Never put this on the
// class path of anything that reads untrusted XML.
package com.thoughtworks.xstream.security;

public class NoTypePermission implements TypePermission {
    public static final TypePermission NONE = new NoTypePermission();

    @Override
    public boolean allows(final Class type) {
        return true;
    }

    @Override
    public int hashCode() {
        return 1;
    }

    @Override
    public boolean equals(final Object obj) {
        return obj != null && obj.getClass() == NoTypePermission.class;
    }
}
